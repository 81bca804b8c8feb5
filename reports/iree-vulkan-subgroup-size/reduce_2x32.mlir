// Row sums of a 2 x 32 matrix. Compiled for the `ampere` (or `rdna3`) Vulkan profile and run on a
// device whose subgroups have 8 lanes (Mesa's lavapipe), each row sums only its first 8 values.
func.func @main(%x: tensor<2x32xf32>) -> tensor<2xf32> {
  %zero = stablehlo.constant dense<0.0> : tensor<f32>
  %sum = stablehlo.reduce(%x init: %zero) applies stablehlo.add across dimensions = [1]
      : (tensor<2x32xf32>, tensor<f32>) -> tensor<2xf32>
  return %sum : tensor<2xf32>
}
