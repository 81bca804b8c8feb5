// den[b, n, t] = sum_r s[b, n, t, r], then out[b, t, n, h] = den[b, n, t] * g[b, t, n, h].
// On Vulkan, IREE fuses the sum and the product into one dispatch; the product reads each den
// from workgroup memory that another invocation writes, with no barrier in between.
func.func @main(%s: tensor<2x2x2x2xf32>, %g: tensor<2x2x2x2xf32>) -> tensor<2x2x2x2xf32> {
  %zero = stablehlo.constant dense<0.0> : tensor<f32>
  %den = stablehlo.reduce(%s init: %zero) applies stablehlo.add across dimensions = [3]
      : (tensor<2x2x2x2xf32>, tensor<f32>) -> tensor<2x2x2xf32>
  %b = stablehlo.broadcast_in_dim %den, dims = [0, 2, 1] : (tensor<2x2x2xf32>) -> tensor<2x2x2x2xf32>
  %out = stablehlo.multiply %b, %g : tensor<2x2x2x2xf32>
  return %out : tensor<2x2x2x2xf32>
}
