// IREE tuning spec for the llvm-cpu targets (`tuning_spec` in targets/cpu.toml).
//
// Data tiling turns f32 matmuls on AVX-512 CPUs into `linalg.mmt4d` on 16x16x1 tiles. IREE's
// default distribution gives each workgroup 2 x 3 tiles (32 rows x 48 columns); 2 x 16 tiles
// (32 x 256) keep a row panel in the cache across four times as many columns. Measured on the
// BERT-base layer (2 cores, interleaved in one process): B=8, T=128 33.0-35.9 ms against 38.3-39.6;
// B=1, T=512 20.9-23.6 against 21.4-24.2; B=1, T=128 unchanged. Ops with other tile shapes (AVX2,
// SSE, Arm, f16, bf16) do not match and keep IREE's defaults.
module @mhagen_cpu_tuning attributes { transform.with_named_sequence, iree_codegen.tuning_spec_with_default_entrypoint } {
  transform.named_sequence @apply_op_config(%op: !transform.any_op {transform.readonly},
                                            %config: !transform.any_param {transform.readonly}) {
    transform.annotate %op "compilation_info" = %config : !transform.any_op, !transform.any_param
    transform.yield
  }

  transform.named_sequence @match_mmt4d_f32_16x16x1(%op: !transform.any_op {transform.readonly})
      -> (!transform.any_op, !transform.any_param) {
    transform.match.operation_name %op ["linalg.mmt4d"] : !transform.any_op
    %lhs = transform.get_operand %op[0] : (!transform.any_op) -> !transform.any_value
    %rhs = transform.get_operand %op[1] : (!transform.any_op) -> !transform.any_value
    %out = transform.get_operand %op[2] : (!transform.any_op) -> !transform.any_value
    transform.iree.match.cast_compatible_type %lhs = tensor<?x?x16x1xf32> : !transform.any_value
    transform.iree.match.cast_compatible_type %rhs = tensor<?x?x16x1xf32> : !transform.any_value
    transform.iree.match.cast_compatible_type %out = tensor<?x?x16x16xf32> : !transform.any_value
    %config = transform.param.constant #iree_codegen.compilation_info<
      lowering_config = #iree_cpu.lowering_config<distribution = [2, 16, 0, 0, 0, 0],
                                                  vector_common_parallel = [1, 1, 0, 16, 16, 0],
                                                  vector_reduction = [0, 0, 1, 0, 0, 1]>,
      translation_info = #iree_codegen.translation_info<pipeline = #iree_cpu.pipeline<Mmt4dTilingExpert>>
    > -> !transform.any_param
    transform.yield %op, %config : !transform.any_op, !transform.any_param
  }

  transform.named_sequence @__kernel_config(%variant_op: !transform.any_op {transform.consumed}) -> !transform.any_op
      attributes { iree_codegen.tuning_spec_entrypoint } {
    %res = transform.foreach_match in %variant_op
        @match_mmt4d_f32_16x16x1 -> @apply_op_config
      : (!transform.any_op) -> !transform.any_op
    transform.yield %res : !transform.any_op
  }
}
