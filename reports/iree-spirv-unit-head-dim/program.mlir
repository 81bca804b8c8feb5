module @jit__lambda attributes {jax.uses_shape_polymorphism = false, mhlo.num_partitions = 1 : i32, mhlo.num_replicas = 1 : i32} {
  func.func public @main(%arg0: tensor<1x2x4x2xf32>, %arg1: tensor<1x1x2x1xf32>) -> (tensor<1x2x4x2xf32> {jax.result_info = "result"}) {
    %cst = stablehlo.constant dense<0.000000e+00> : tensor<f32>
    %cst_0 = stablehlo.constant dense<0xFF800000> : tensor<f32>
    %cst_1 = stablehlo.constant dense<1.000000e+00> : tensor<f32>
    %cst_2 = stablehlo.constant dense<[[[0.335486263], [-0.56390506]], [[-1.12438059], [-1.18426061]]]> : tensor<2x2x1xf32>
    %cst_3 = stablehlo.constant dense<0.000000e+00> : tensor<2x1xf32>
    %cst_4 = stablehlo.constant dense<[[[-1.18560863], [-0.275947601]]]> : tensor<1x2x1xf32>
    %cst_5 = stablehlo.constant dense<[[[1.08349109], [-0.767655849]]]> : tensor<1x2x1xf32>
    %cst_6 = stablehlo.constant dense<[[[-0.215328887, -0.702280641]], [[0.560342669, 0.112461239]]]> : tensor<2x1x2xf32>
    %cst_7 = stablehlo.constant dense<0.000000e+00> : tensor<2xf32>
    %0 = stablehlo.dot_general %arg0, %cst_2, contracting_dims = [3] x [0] : (tensor<1x2x4x2xf32>, tensor<2x2x1xf32>) -> tensor<1x2x4x2x1xf32>
    %1 = stablehlo.broadcast_in_dim %cst_3, dims = [3, 4] : (tensor<2x1xf32>) -> tensor<1x1x1x2x1xf32>
    %2 = stablehlo.broadcast_in_dim %1, dims = [0, 1, 2, 3, 4] : (tensor<1x1x1x2x1xf32>) -> tensor<1x2x4x2x1xf32>
    %3 = stablehlo.add %0, %2 : tensor<1x2x4x2x1xf32>
    %4 = stablehlo.broadcast_in_dim %cst_1, dims = [] : (tensor<f32>) -> tensor<1x2x4x2x1xf32>
    %5 = stablehlo.multiply %3, %4 : tensor<1x2x4x2x1xf32>
    %6 = stablehlo.dot_general %arg1, %cst_4, contracting_dims = [3] x [0] : (tensor<1x1x2x1xf32>, tensor<1x2x1xf32>) -> tensor<1x1x2x2x1xf32>
    %7 = stablehlo.broadcast_in_dim %cst_3, dims = [3, 4] : (tensor<2x1xf32>) -> tensor<1x1x1x2x1xf32>
    %8 = stablehlo.broadcast_in_dim %7, dims = [0, 1, 2, 3, 4] : (tensor<1x1x1x2x1xf32>) -> tensor<1x1x2x2x1xf32>
    %9 = stablehlo.add %6, %8 : tensor<1x1x2x2x1xf32>
    %10 = stablehlo.dot_general %arg1, %cst_5, contracting_dims = [3] x [0] : (tensor<1x1x2x1xf32>, tensor<1x2x1xf32>) -> tensor<1x1x2x2x1xf32>
    %11 = stablehlo.broadcast_in_dim %cst_3, dims = [3, 4] : (tensor<2x1xf32>) -> tensor<1x1x1x2x1xf32>
    %12 = stablehlo.broadcast_in_dim %11, dims = [0, 1, 2, 3, 4] : (tensor<1x1x1x2x1xf32>) -> tensor<1x1x2x2x1xf32>
    %13 = stablehlo.add %10, %12 : tensor<1x1x2x2x1xf32>
    %14 = stablehlo.dot_general %5, %9, batching_dims = [0, 3] x [0, 3], contracting_dims = [4] x [4] : (tensor<1x2x4x2x1xf32>, tensor<1x1x2x2x1xf32>) -> tensor<1x2x2x4x1x2xf32>
    %15 = stablehlo.reduce(%14 init: %cst_0) applies stablehlo.maximum across dimensions = [4, 5] : (tensor<1x2x2x4x1x2xf32>, tensor<f32>) -> tensor<1x2x2x4xf32>
    %16 = stablehlo.broadcast_in_dim %cst_0, dims = [] : (tensor<f32>) -> tensor<1x2x2x4xf32>
    %17 = stablehlo.maximum %16, %15 : tensor<1x2x2x4xf32>
    %18 = stablehlo.broadcast_in_dim %17, dims = [0, 1, 2, 3] : (tensor<1x2x2x4xf32>) -> tensor<1x2x2x4x1x1xf32>
    %19 = stablehlo.broadcast_in_dim %18, dims = [0, 1, 2, 3, 4, 5] : (tensor<1x2x2x4x1x1xf32>) -> tensor<1x2x2x4x1x2xf32>
    %20 = stablehlo.subtract %14, %19 : tensor<1x2x2x4x1x2xf32>
    %21 = stablehlo.exponential %20 : tensor<1x2x2x4x1x2xf32>
    %22 = stablehlo.reduce(%21 init: %cst) applies stablehlo.add across dimensions = [4, 5] : (tensor<1x2x2x4x1x2xf32>, tensor<f32>) -> tensor<1x2x2x4xf32>
    %23 = stablehlo.broadcast_in_dim %22, dims = [0, 1, 2, 3] : (tensor<1x2x2x4xf32>) -> tensor<1x2x2x4x1x1xf32>
    %24 = stablehlo.broadcast_in_dim %23, dims = [0, 1, 2, 3, 4, 5] : (tensor<1x2x2x4x1x1xf32>) -> tensor<1x2x2x4x1x2xf32>
    %25 = stablehlo.divide %21, %24 : tensor<1x2x2x4x1x2xf32>
    %26 = stablehlo.dot_general %13, %25, batching_dims = [0, 3] x [0, 1], contracting_dims = [1, 2] x [4, 5] : (tensor<1x1x2x2x1xf32>, tensor<1x2x2x4x1x2xf32>) -> tensor<1x2x1x2x4xf32>
    %27 = stablehlo.transpose %26, dims = [0, 3, 4, 1, 2] : (tensor<1x2x1x2x4xf32>) -> tensor<1x2x4x2x1xf32>
    %28 = stablehlo.dot_general %27, %cst_6, contracting_dims = [3, 4] x [0, 1] : (tensor<1x2x4x2x1xf32>, tensor<2x1x2xf32>) -> tensor<1x2x4x2xf32>
    %29 = stablehlo.broadcast_in_dim %cst_7, dims = [3] : (tensor<2xf32>) -> tensor<1x1x1x2xf32>
    %30 = stablehlo.broadcast_in_dim %29, dims = [0, 1, 2, 3] : (tensor<1x1x1x2xf32>) -> tensor<1x2x4x2xf32>
    %31 = stablehlo.add %28, %30 : tensor<1x2x4x2xf32>
    return %31 : tensor<1x2x4x2xf32>
  }
}
