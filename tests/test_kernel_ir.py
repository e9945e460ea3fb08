"""The Triton kernels lowered to Triton IR for an H100 on the CPU: the compiler's front end checks what the
interpreter (tests/test_kernels.py) does not. Triton's compiler API is internal: this fails loudly when it
moves, as a test should."""

import importlib
import inspect
import os

import pytest
import triton
from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

#: Pointer element types as the dispatcher passes them (model data in bf16, the greedy matrix in float32).
POINTERS = {
    "_gather_rows_kernel": {"x_ptr": "bf16", "index_ptr": "i64", "out_ptr": "bf16"},
    "_gather_sequence_kernel": {
        "hidden_ptr": "bf16",
        "pos_ptr": "i64",
        "mask_ptr": "i64",
        "index_ptr": "i64",
        "valid_ptr": "i1",
        "out_hidden_ptr": "bf16",
        "out_pos_ptr": "i64",
        "out_mask_ptr": "i64",
    },
    "_gather_kv_kernel": {
        "k_ptr": "bf16",
        "v_ptr": "bf16",
        "index_ptr": "i64",
        "out_k_ptr": "bf16",
        "out_v_ptr": "bf16",
    },
    "_merge_kernel": {
        "x_ptr": "bf16",
        "size_ptr": "fp32",
        "dest_ptr": "i64",
        "acc_ptr": "fp32",
        "total_ptr": "fp32",
    },
    "_greedy_select_kernel": {
        "matrix_ptr": "fp32",
        "relevance_ptr": "fp32",
        "first_ptr": "i64",
        "out_ptr": "i64",
    },
    "_greedy_dpp_kernel": {"kernel_ptr": "fp32", "factor_ptr": "fp32", "out_ptr": "i64"},
    "_attention_top_k_kernel": {
        "query_ptr": "bf16",
        "key_ptr": "bf16",
        "allowed_ptr": "i1",
        "positions_ptr": "i64",
        "sample_ptr": "i64",
        "attend_ptr": "i1",
        "visible_ptr": "i1",
    },
    "_greedy_coverage_kernel": {
        "matrix_ptr": "i32",
        "saliency_ptr": "fp32",
        "covered_ptr": "i32",
        "out_ptr": "i64",
    },
}
#: Kernels of a module of their own (the others are in ``tokenprune.kernels.triton_kernels``).
MODULES = {"_greedy_dpp_kernel": "tokenprune.kernels.triton_dpp"}
CONSTEXPRS = [
    *[{"BLOCK": 128}] * 4,
    {"BLOCK": 1024, "MMR": True},
    {"BLOCK": 1024, "UNROLL": 4},
    {"HEADS": 32, "GROUPS": 4, "HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_C": 64, "BLOCK_N": 1024},
    {"ROWS": 8, "BLOCK": 1024},
    {"BLOCK": 64, "MMR": False},
]


@pytest.mark.parametrize(
    ("name", "constexprs"), list(zip([*POINTERS, "_greedy_select_kernel"], CONSTEXPRS, strict=True))
)
def test_kernels_lower_to_triton_ir_for_an_h100(name, constexprs):
    """The Triton front end, run on the CPU for an sm_90 target: the type checks the interpreter skips (a
    loop-carried value that changes type, say) fail here, not first on a GPU."""
    assert os.environ.get("TRITON_INTERPRET") != "1"
    kernel = getattr(importlib.import_module(MODULES.get(name, "tokenprune.kernels.triton_kernels")), name)
    params = inspect.signature(kernel.fn).parameters
    signature = {
        p: "constexpr" if p in constexprs else f"*{POINTERS[name][p]}" if p.endswith("_ptr") else "i32"
        for p in params
    }
    signature.update({p: "fp32" for p in params if p in ("penalty", "scaling", "scale")})
    target = GPUTarget("cuda", 90, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    source.make_ir(
        target, options, backend.get_codegen_implementation(options), backend.get_module_map(), context
    )
