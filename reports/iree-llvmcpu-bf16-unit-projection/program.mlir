module @jit__lambda attributes {jax.uses_shape_polymorphism = false, mhlo.num_partitions = 1 : i32, mhlo.num_replicas = 1 : i32} {
  func.func public @main(%arg0: tensor<1x1x1xbf16>, %arg1: tensor<1x2x6xbf16>) -> (tensor<1x1x1xbf16> {jax.result_info = "result"}) {
    %cst = stablehlo.constant dense<0.000000e+00> : tensor<bf16>
    %cst_0 = stablehlo.constant dense<0.000000e+00> : tensor<f32>
    %cst_1 = stablehlo.constant dense<0xFF80> : tensor<bf16>
    %cst_2 = stablehlo.constant dense<1.000000e+00> : tensor<bf16>
    %cst_3 = stablehlo.constant dense<4.746090e-01> : tensor<1x1x1xbf16>
    %cst_4 = stablehlo.constant dense<0.000000e+00> : tensor<1x1xbf16>
    %cst_5 = stablehlo.constant dense<[[[-7.773430e-01]], [[-1.806640e-01]], [[1.875000e-01]], [[-6.562500e-01]], [[-7.109380e-01]], [[-3.203130e-01]]]> : tensor<6x1x1xbf16>
    %cst_6 = stablehlo.constant dense<[[[7.109380e-01]], [[-5.039060e-01]], [[-1.650390e-01]], [[-9.863280e-02]], [[5.039060e-01]], [[-5.195310e-01]]]> : tensor<6x1x1xbf16>
    %cst_7 = stablehlo.constant dense<-3.046880e-01> : tensor<1x1x1xbf16>
    %cst_8 = stablehlo.constant dense<0.000000e+00> : tensor<1xbf16>
    %0 = stablehlo.dot_general %arg0, %cst_3, contracting_dims = [2] x [0] : (tensor<1x1x1xbf16>, tensor<1x1x1xbf16>) -> tensor<1x1x1x1xbf16>
    %1 = stablehlo.broadcast_in_dim %cst_4, dims = [2, 3] : (tensor<1x1xbf16>) -> tensor<1x1x1x1xbf16>
    %2 = stablehlo.add %0, %1 : tensor<1x1x1x1xbf16>
    %3 = stablehlo.broadcast_in_dim %cst_2, dims = [] : (tensor<bf16>) -> tensor<1x1x1x1xbf16>
    %4 = stablehlo.multiply %2, %3 : tensor<1x1x1x1xbf16>
    %5 = stablehlo.dot_general %arg1, %cst_5, contracting_dims = [2] x [0] : (tensor<1x2x6xbf16>, tensor<6x1x1xbf16>) -> tensor<1x2x1x1xbf16>
    %6 = stablehlo.broadcast_in_dim %cst_4, dims = [2, 3] : (tensor<1x1xbf16>) -> tensor<1x1x1x1xbf16>
    %7 = stablehlo.broadcast_in_dim %6, dims = [0, 1, 2, 3] : (tensor<1x1x1x1xbf16>) -> tensor<1x2x1x1xbf16>
    %8 = stablehlo.add %5, %7 : tensor<1x2x1x1xbf16>
    %9 = stablehlo.dot_general %arg1, %cst_6, contracting_dims = [2] x [0] : (tensor<1x2x6xbf16>, tensor<6x1x1xbf16>) -> tensor<1x2x1x1xbf16>
    %10 = stablehlo.broadcast_in_dim %cst_4, dims = [2, 3] : (tensor<1x1xbf16>) -> tensor<1x1x1x1xbf16>
    %11 = stablehlo.broadcast_in_dim %10, dims = [0, 1, 2, 3] : (tensor<1x1x1x1xbf16>) -> tensor<1x2x1x1xbf16>
    %12 = stablehlo.add %9, %11 : tensor<1x2x1x1xbf16>
    %13 = stablehlo.dot_general %4, %8, batching_dims = [0, 2] x [0, 2], contracting_dims = [3] x [3] : (tensor<1x1x1x1xbf16>, tensor<1x2x1x1xbf16>) -> tensor<1x1x1x2xbf16>
    %14 = stablehlo.reduce(%13 init: %cst_1) applies stablehlo.maximum across dimensions = [3] : (tensor<1x1x1x2xbf16>, tensor<bf16>) -> tensor<1x1x1xbf16>
    %15 = stablehlo.broadcast_in_dim %14, dims = [0, 1, 2] : (tensor<1x1x1xbf16>) -> tensor<1x1x1x1xbf16>
    %16 = stablehlo.broadcast_in_dim %15, dims = [0, 1, 2, 3] : (tensor<1x1x1x1xbf16>) -> tensor<1x1x1x2xbf16>
    %17 = stablehlo.subtract %13, %16 : tensor<1x1x1x2xbf16>
    %18 = stablehlo.exponential %17 : tensor<1x1x1x2xbf16>
    %19 = stablehlo.dot_general %18, %12, batching_dims = [0, 1] x [0, 2], contracting_dims = [3] x [1] : (tensor<1x1x1x2xbf16>, tensor<1x2x1x1xbf16>) -> tensor<1x1x1x1xbf16>
    %20 = stablehlo.convert %18 : (tensor<1x1x1x2xbf16>) -> tensor<1x1x1x2xf32>
    %21 = stablehlo.reduce(%20 init: %cst_0) applies stablehlo.add across dimensions = [3] : (tensor<1x1x1x2xf32>, tensor<f32>) -> tensor<1x1x1xf32>
    %22 = stablehlo.broadcast_in_dim %21, dims = [0, 1, 2] : (tensor<1x1x1xf32>) -> tensor<1x1x1x1xf32>
    %23 = stablehlo.convert %22 : (tensor<1x1x1x1xf32>) -> tensor<1x1x1x1xbf16>
    %24 = stablehlo.broadcast_in_dim %cst, dims = [] : (tensor<bf16>) -> tensor<1x1x1x1xbf16>
    %25 = stablehlo.compare GT, %23, %24, FLOAT : (tensor<1x1x1x1xbf16>, tensor<1x1x1x1xbf16>) -> tensor<1x1x1x1xi1>
    %26 = call @_where(%25, %23, %cst_2) : (tensor<1x1x1x1xi1>, tensor<1x1x1x1xbf16>, tensor<bf16>) -> tensor<1x1x1x1xbf16>
    %27 = stablehlo.divide %19, %26 : tensor<1x1x1x1xbf16>
    %28 = stablehlo.transpose %27, dims = [0, 2, 1, 3] : (tensor<1x1x1x1xbf16>) -> tensor<1x1x1x1xbf16>
    %29 = stablehlo.dot_general %28, %cst_7, contracting_dims = [2, 3] x [0, 1] : (tensor<1x1x1x1xbf16>, tensor<1x1x1xbf16>) -> tensor<1x1x1xbf16>
    %30 = stablehlo.broadcast_in_dim %cst_8, dims = [2] : (tensor<1xbf16>) -> tensor<1x1x1xbf16>
    %31 = stablehlo.add %29, %30 : tensor<1x1x1xbf16>
    return %31 : tensor<1x1x1xbf16>
  }
  func.func private @_where(%arg0: tensor<1x1x1x1xi1>, %arg1: tensor<1x1x1x1xbf16>, %arg2: tensor<bf16>) -> tensor<1x1x1x1xbf16> {
    %0 = stablehlo.broadcast_in_dim %arg2, dims = [] : (tensor<bf16>) -> tensor<1x1x1x1xbf16>
    %1 = stablehlo.select %arg0, %arg1, %0 : tensor<1x1x1x1xi1>, tensor<1x1x1x1xbf16>
    return %1 : tensor<1x1x1x1xbf16>
  }
}
