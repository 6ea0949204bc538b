"""bench/devtools/compile_spills.py without compiling (that needs the GPU machine's triton): the
arguments it types for each ExpoSB kernel are what a contiguous bf16 launch specialises to."""

import pytest

from attnbench.devtools.compile_spills import _signature, constexpr_names
from attnbench.kernels.exposb_bwd import exposb_dkdv_kernel, exposb_dq_kernel
from attnbench.kernels.exposb_fwd import exposb_fwd_kernel


@pytest.mark.parametrize("kernel", [exposb_fwd_kernel, exposb_dq_kernel, exposb_dkdv_kernel], ids=["fwd", "dq", "dkdv"])
def test_every_argument_is_typed_as_a_launch_specialises_it(kernel):
    every = dict(HAS_LENS=False, CAUSAL=True, D=64, GROUP=1, BLOCK_M=64, BLOCK_N=64, DOT_PRECISION="tf32", TMA=False, STORE_QT=True)
    constexprs = constexpr_names(kernel)
    signature, constants, attrs = _signature(kernel, {name: every[name] for name in constexprs})
    assert list(signature) == kernel.arg_names, "one entry per argument, in order"
    assert signature["CAUSAL"] == "constexpr" and constants["CAUSAL"] is True
    for name in ("H", "GROUP", "T", "S"):
        if name in constexprs:
            assert signature[name] == "constexpr", f"{name} is a compile-time size of this kernel"
        elif name in kernel.arg_names:
            assert signature[name] == "i32", f"{name} is a size, not a pointer"
    assert signature["sm_scale"] == "fp32" and signature["SEQ_LENS"] == "*i32"
    unit_strides = [name for name in kernel.arg_names if name.startswith("stride_") and name.endswith("d")]
    assert unit_strides and all(constants[name] == 1 for name in unit_strides)
    divisible = {kernel.arg_names[index] for (index,) in attrs}
    assert "stride_param" not in divisible and all(signature[name] != "constexpr" for name in divisible)


def test_a_constexpr_left_without_a_value_is_named():
    with pytest.raises(ValueError, match="GROUP"):
        _signature(exposb_dkdv_kernel, {"HAS_LENS": False, "CAUSAL": True, "D": 64, "BLOCK_M": 64, "BLOCK_N": 64, "DOT_PRECISION": "tf32"})
