// Keras MultiHeadAttention(num_heads=2, key_dim=2, use_gate=True) on query (2, 2, 2), value (2, 2, 2), weights inline: the program the reduced case came from.
module @jit__lambda attributes {jax.uses_shape_polymorphism = false, mhlo.num_partitions = 1 : i32, mhlo.num_replicas = 1 : i32} {
  func.func public @main(%arg0: tensor<2x2x2xf32>, %arg1: tensor<2x2x2xf32>) -> (tensor<2x2x2xf32> {jax.result_info = "result"}) {
    %cst = stablehlo.constant dense<1.000000e+00> : tensor<f32>
    %cst_0 = stablehlo.constant dense<0.000000e+00> : tensor<f32>
    %cst_1 = stablehlo.constant dense<0xFF800000> : tensor<f32>
    %cst_2 = stablehlo.constant dense<0.707106769> : tensor<f32>
    %cst_3 = stablehlo.constant dense<[[[0.273923367, -0.460426569], [-0.918052971, -0.966944754]], [[0.626540482, 0.825511157], [0.213271558, 0.458993107]]]> : tensor<2x2x2xf32>
    %cst_4 = stablehlo.constant dense<0.000000e+00> : tensor<2x2xf32>
    %cst_5 = stablehlo.constant dense<[[[-0.838351905, -0.195124418], [0.202578411, -0.709799528]], [[-0.769362568, -0.346122593], [-0.763316631, -0.246352613]]]> : tensor<2x2x2xf32>
    %cst_6 = stablehlo.constant dense<[[[-0.175815299, -0.573409736], [0.457517892, 0.0918242186]], [[0.0661849827, 0.253268391], [6.481310e-01, -0.858084917]]]> : tensor<2x2x2xf32>
    %cst_7 = stablehlo.constant dense<[[[0.766143858, -0.542814672], [-0.17870681, -0.106613442]], [[0.542564631, -0.560832322], [0.37888059, 0.653075695]]]> : tensor<2x2x2xf32>
    %cst_8 = stablehlo.constant dense<[[[0.519373477, 0.551795363], [-0.698692262, -0.845023394]], [[-0.0395264812, 0.0697176605], [0.310252547, 0.199953988]]]> : tensor<2x2x2xf32>
    %cst_9 = stablehlo.constant dense<0.000000e+00> : tensor<2xf32>
    %0 = stablehlo.dot_general %arg0, %cst_3, contracting_dims = [2] x [0] : (tensor<2x2x2xf32>, tensor<2x2x2xf32>) -> tensor<2x2x2x2xf32>
    %1 = stablehlo.broadcast_in_dim %cst_4, dims = [2, 3] : (tensor<2x2xf32>) -> tensor<1x1x2x2xf32>
    %2 = stablehlo.broadcast_in_dim %1, dims = [0, 1, 2, 3] : (tensor<1x1x2x2xf32>) -> tensor<2x2x2x2xf32>
    %3 = stablehlo.add %0, %2 : tensor<2x2x2x2xf32>
    %4 = stablehlo.broadcast_in_dim %cst_2, dims = [] : (tensor<f32>) -> tensor<2x2x2x2xf32>
    %5 = stablehlo.multiply %3, %4 : tensor<2x2x2x2xf32>
    %6 = stablehlo.dot_general %arg1, %cst_5, contracting_dims = [2] x [0] : (tensor<2x2x2xf32>, tensor<2x2x2xf32>) -> tensor<2x2x2x2xf32>
    %7 = stablehlo.broadcast_in_dim %cst_4, dims = [2, 3] : (tensor<2x2xf32>) -> tensor<1x1x2x2xf32>
    %8 = stablehlo.broadcast_in_dim %7, dims = [0, 1, 2, 3] : (tensor<1x1x2x2xf32>) -> tensor<2x2x2x2xf32>
    %9 = stablehlo.add %6, %8 : tensor<2x2x2x2xf32>
    %10 = stablehlo.dot_general %arg1, %cst_6, contracting_dims = [2] x [0] : (tensor<2x2x2xf32>, tensor<2x2x2xf32>) -> tensor<2x2x2x2xf32>
    %11 = stablehlo.broadcast_in_dim %cst_4, dims = [2, 3] : (tensor<2x2xf32>) -> tensor<1x1x2x2xf32>
    %12 = stablehlo.broadcast_in_dim %11, dims = [0, 1, 2, 3] : (tensor<1x1x2x2xf32>) -> tensor<2x2x2x2xf32>
    %13 = stablehlo.add %10, %12 : tensor<2x2x2x2xf32>
    %14 = stablehlo.dot_general %5, %9, batching_dims = [0, 2] x [0, 2], contracting_dims = [3] x [3] : (tensor<2x2x2x2xf32>, tensor<2x2x2x2xf32>) -> tensor<2x2x2x2xf32>
    %15 = stablehlo.reduce(%14 init: %cst_1) applies stablehlo.maximum across dimensions = [3] : (tensor<2x2x2x2xf32>, tensor<f32>) -> tensor<2x2x2xf32>
    %16 = stablehlo.broadcast_in_dim %15, dims = [0, 1, 2] : (tensor<2x2x2xf32>) -> tensor<2x2x2x1xf32>
    %17 = stablehlo.broadcast_in_dim %16, dims = [0, 1, 2, 3] : (tensor<2x2x2x1xf32>) -> tensor<2x2x2x2xf32>
    %18 = stablehlo.subtract %14, %17 : tensor<2x2x2x2xf32>
    %19 = stablehlo.exponential %18 : tensor<2x2x2x2xf32>
    %20 = stablehlo.dot_general %19, %13, batching_dims = [0, 1] x [0, 2], contracting_dims = [3] x [1] : (tensor<2x2x2x2xf32>, tensor<2x2x2x2xf32>) -> tensor<2x2x2x2xf32>
    %21 = stablehlo.reduce(%19 init: %cst_0) applies stablehlo.add across dimensions = [3] : (tensor<2x2x2x2xf32>, tensor<f32>) -> tensor<2x2x2xf32>
    %22 = stablehlo.broadcast_in_dim %21, dims = [0, 1, 2] : (tensor<2x2x2xf32>) -> tensor<2x2x2x1xf32>
    %23 = stablehlo.broadcast_in_dim %cst_0, dims = [] : (tensor<f32>) -> tensor<2x2x2x1xf32>
    %24 = stablehlo.compare GT, %22, %23, FLOAT : (tensor<2x2x2x1xf32>, tensor<2x2x2x1xf32>) -> tensor<2x2x2x1xi1>
    %25 = call @_where(%24, %22, %cst) : (tensor<2x2x2x1xi1>, tensor<2x2x2x1xf32>, tensor<f32>) -> tensor<2x2x2x1xf32>
    %26 = stablehlo.broadcast_in_dim %25, dims = [0, 1, 2, 3] : (tensor<2x2x2x1xf32>) -> tensor<2x2x2x2xf32>
    %27 = stablehlo.divide %20, %26 : tensor<2x2x2x2xf32>
    %28 = stablehlo.transpose %27, dims = [0, 2, 1, 3] : (tensor<2x2x2x2xf32>) -> tensor<2x2x2x2xf32>
    %29 = stablehlo.dot_general %arg0, %cst_7, contracting_dims = [2] x [0] : (tensor<2x2x2xf32>, tensor<2x2x2xf32>) -> tensor<2x2x2x2xf32>
    %30 = stablehlo.broadcast_in_dim %cst_4, dims = [2, 3] : (tensor<2x2xf32>) -> tensor<1x1x2x2xf32>
    %31 = stablehlo.broadcast_in_dim %30, dims = [0, 1, 2, 3] : (tensor<1x1x2x2xf32>) -> tensor<2x2x2x2xf32>
    %32 = stablehlo.add %29, %31 : tensor<2x2x2x2xf32>
    %33 = stablehlo.negate %32 : tensor<2x2x2x2xf32>
    %34 = stablehlo.exponential %33 : tensor<2x2x2x2xf32>
    %35 = stablehlo.broadcast_in_dim %cst, dims = [] : (tensor<f32>) -> tensor<2x2x2x2xf32>
    %36 = stablehlo.add %35, %34 : tensor<2x2x2x2xf32>
    %37 = stablehlo.broadcast_in_dim %cst, dims = [] : (tensor<f32>) -> tensor<2x2x2x2xf32>
    %38 = stablehlo.divide %37, %36 : tensor<2x2x2x2xf32>
    %39 = stablehlo.multiply %28, %38 : tensor<2x2x2x2xf32>
    %40 = stablehlo.dot_general %39, %cst_8, contracting_dims = [2, 3] x [0, 1] : (tensor<2x2x2x2xf32>, tensor<2x2x2xf32>) -> tensor<2x2x2xf32>
    %41 = stablehlo.broadcast_in_dim %cst_9, dims = [2] : (tensor<2xf32>) -> tensor<1x1x2xf32>
    %42 = stablehlo.broadcast_in_dim %41, dims = [0, 1, 2] : (tensor<1x1x2xf32>) -> tensor<2x2x2xf32>
    %43 = stablehlo.add %40, %42 : tensor<2x2x2xf32>
    return %43 : tensor<2x2x2xf32>
  }
  func.func private @_where(%arg0: tensor<2x2x2x1xi1>, %arg1: tensor<2x2x2x1xf32>, %arg2: tensor<f32>) -> tensor<2x2x2x1xf32> {
    %0 = stablehlo.broadcast_in_dim %arg2, dims = [] : (tensor<f32>) -> tensor<2x2x2x1xf32>
    %1 = stablehlo.select %arg0, %arg1, %0 : tensor<2x2x2x1xi1>, tensor<2x2x2x1xf32>
    return %1 : tensor<2x2x2x1xf32>
  }
}
