// Keras MultiHeadAttention(num_heads=1, key_dim=1) on query (1, 1, 1), value (1, 32, 1), weights inline: the program the reduced case came from.
module @jit__lambda attributes {jax.uses_shape_polymorphism = false, mhlo.num_partitions = 1 : i32, mhlo.num_replicas = 1 : i32} {
  func.func public @main(%arg0: tensor<1x1x1xf32>, %arg1: tensor<1x32x1xf32>) -> (tensor<1x1x1xf32> {jax.result_info = "result"}) {
    %cst = stablehlo.constant dense<0.000000e+00> : tensor<f32>
    %cst_0 = stablehlo.constant dense<0xFF800000> : tensor<f32>
    %cst_1 = stablehlo.constant dense<1.000000e+00> : tensor<f32>
    %cst_2 = stablehlo.constant dense<0.474449188> : tensor<1x1x1xf32>
    %cst_3 = stablehlo.constant dense<0.000000e+00> : tensor<1x1xf32>
    %cst_4 = stablehlo.constant dense<-1.45206809> : tensor<1x1x1xf32>
    %cst_5 = stablehlo.constant dense<1.32700014> : tensor<1x1x1xf32>
    %cst_6 = stablehlo.constant dense<-0.304521054> : tensor<1x1x1xf32>
    %cst_7 = stablehlo.constant dense<0.000000e+00> : tensor<1xf32>
    %0 = stablehlo.dot_general %arg0, %cst_2, contracting_dims = [2] x [0] : (tensor<1x1x1xf32>, tensor<1x1x1xf32>) -> tensor<1x1x1x1xf32>
    %1 = stablehlo.broadcast_in_dim %cst_3, dims = [2, 3] : (tensor<1x1xf32>) -> tensor<1x1x1x1xf32>
    %2 = stablehlo.add %0, %1 : tensor<1x1x1x1xf32>
    %3 = stablehlo.broadcast_in_dim %cst_1, dims = [] : (tensor<f32>) -> tensor<1x1x1x1xf32>
    %4 = stablehlo.multiply %2, %3 : tensor<1x1x1x1xf32>
    %5 = stablehlo.dot_general %arg1, %cst_4, contracting_dims = [2] x [0] : (tensor<1x32x1xf32>, tensor<1x1x1xf32>) -> tensor<1x32x1x1xf32>
    %6 = stablehlo.broadcast_in_dim %cst_3, dims = [2, 3] : (tensor<1x1xf32>) -> tensor<1x1x1x1xf32>
    %7 = stablehlo.broadcast_in_dim %6, dims = [0, 1, 2, 3] : (tensor<1x1x1x1xf32>) -> tensor<1x32x1x1xf32>
    %8 = stablehlo.add %5, %7 : tensor<1x32x1x1xf32>
    %9 = stablehlo.dot_general %arg1, %cst_5, contracting_dims = [2] x [0] : (tensor<1x32x1xf32>, tensor<1x1x1xf32>) -> tensor<1x32x1x1xf32>
    %10 = stablehlo.broadcast_in_dim %cst_3, dims = [2, 3] : (tensor<1x1xf32>) -> tensor<1x1x1x1xf32>
    %11 = stablehlo.broadcast_in_dim %10, dims = [0, 1, 2, 3] : (tensor<1x1x1x1xf32>) -> tensor<1x32x1x1xf32>
    %12 = stablehlo.add %9, %11 : tensor<1x32x1x1xf32>
    %13 = stablehlo.dot_general %4, %8, batching_dims = [0, 2] x [0, 2], contracting_dims = [3] x [3] : (tensor<1x1x1x1xf32>, tensor<1x32x1x1xf32>) -> tensor<1x1x1x32xf32>
    %14 = stablehlo.reduce(%13 init: %cst_0) applies stablehlo.maximum across dimensions = [3] : (tensor<1x1x1x32xf32>, tensor<f32>) -> tensor<1x1x1xf32>
    %15 = stablehlo.broadcast_in_dim %14, dims = [0, 1, 2] : (tensor<1x1x1xf32>) -> tensor<1x1x1x1xf32>
    %16 = stablehlo.broadcast_in_dim %15, dims = [0, 1, 2, 3] : (tensor<1x1x1x1xf32>) -> tensor<1x1x1x32xf32>
    %17 = stablehlo.subtract %13, %16 : tensor<1x1x1x32xf32>
    %18 = stablehlo.exponential %17 : tensor<1x1x1x32xf32>
    %19 = stablehlo.dot_general %18, %12, batching_dims = [0, 1] x [0, 2], contracting_dims = [3] x [1] : (tensor<1x1x1x32xf32>, tensor<1x32x1x1xf32>) -> tensor<1x1x1x1xf32>
    %20 = stablehlo.reduce(%18 init: %cst) applies stablehlo.add across dimensions = [3] : (tensor<1x1x1x32xf32>, tensor<f32>) -> tensor<1x1x1xf32>
    %21 = stablehlo.broadcast_in_dim %20, dims = [0, 1, 2] : (tensor<1x1x1xf32>) -> tensor<1x1x1x1xf32>
    %22 = stablehlo.broadcast_in_dim %cst, dims = [] : (tensor<f32>) -> tensor<1x1x1x1xf32>
    %23 = stablehlo.compare GT, %21, %22, FLOAT : (tensor<1x1x1x1xf32>, tensor<1x1x1x1xf32>) -> tensor<1x1x1x1xi1>
    %24 = call @_where(%23, %21, %cst_1) : (tensor<1x1x1x1xi1>, tensor<1x1x1x1xf32>, tensor<f32>) -> tensor<1x1x1x1xf32>
    %25 = stablehlo.divide %19, %24 : tensor<1x1x1x1xf32>
    %26 = stablehlo.transpose %25, dims = [0, 2, 1, 3] : (tensor<1x1x1x1xf32>) -> tensor<1x1x1x1xf32>
    %27 = stablehlo.dot_general %26, %cst_6, contracting_dims = [2, 3] x [0, 1] : (tensor<1x1x1x1xf32>, tensor<1x1x1xf32>) -> tensor<1x1x1xf32>
    %28 = stablehlo.broadcast_in_dim %cst_7, dims = [2] : (tensor<1xf32>) -> tensor<1x1x1xf32>
    %29 = stablehlo.add %27, %28 : tensor<1x1x1xf32>
    return %29 : tensor<1x1x1xf32>
  }
  func.func private @_where(%arg0: tensor<1x1x1x1xi1>, %arg1: tensor<1x1x1x1xf32>, %arg2: tensor<f32>) -> tensor<1x1x1x1xf32> {
    %0 = stablehlo.broadcast_in_dim %arg2, dims = [] : (tensor<f32>) -> tensor<1x1x1x1xf32>
    %1 = stablehlo.select %arg0, %arg1, %0 : tensor<1x1x1x1xi1>, tensor<1x1x1x1xf32>
    return %1 : tensor<1x1x1x1xf32>
  }
}
