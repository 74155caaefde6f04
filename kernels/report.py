"""`fastpmd kernels-report --arch 90 --out DIR`: compile every kernel x pinned config for a GPU target, no GPU.

Targets: sm_80 (Ampere/Ada family), sm_90 (Hopper), sm_100 (datacenter Blackwell), sm_120 (consumer Blackwell);
each compiles its own config family (configs.py, _runtime.family_of_capability).

For each (kernel variant, config) it runs triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)),
writes the cubin (and PTX) to DIR, reads register/stack use with `cuobjdump --dump-resource-usage` and counts
SASS instructions with `nvdisasm` (both shipped in the triton wheel), and writes DIR/report.json, one row per
kernel x config. A row fails when the kernel does not compile, spills (stack/local bytes or LDL/STL in SASS),
needs more shared memory than the architecture has (SMEM_LIMIT per block), or when a kernel with matrix tiles
does not use the architecture's tensor-core instruction (TC_OP: HMMA = mma.sync on sm_80 and sm_120, HGMMA =
wgmma on sm_90, UTCHMMA = tcgen05.mma on sm_100, as nvdisasm prints them).
Exit status: 0 when every row passes, 1 otherwise.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastpmd._cli import ArgumentParser, check_out_dir

from . import configs
from ._runtime import family_of_capability
from .dlogits import _dlogits_kernel
from .logits import _logits_fwd_kernel, _merge_kernel
from .matmul import _matmul_kernel
from .pmd_epilogue import _pmd_epilogue_kernel
from .shifted_exp import SHIFT_LIMIT, _shifted_exp_kernel

ARCHS = (80, 90, 100, 120)
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}
TC_OP = {80: "HMMA", 90: "HGMMA", 100: "UTCHMMA", 120: "HMMA"}
# build name -> operand dtype. fp32: TF32 dots (float32 matmul precision "high"/"medium", tensor cores);
# fp32-ieee: exact fp32 dots (precision "highest", FMA units: no tensor-core requirement)
_OPERAND_DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32", "fp32-ieee": "fp32"}
DIVISIBLE_BY_16 = [["tt.divisibility", 16]]


def _variants(dt: str, ieee: bool = False):
    """(name, kernel, config family, args, tensor-core tiles?, fp32 operands?) with args: name -> '*type' | 'i32' |
    'i32D' | 'fp32' | constexpr value.
    'i32D' marks an int the JIT would see divisible by 16; a contiguous stride is the constexpr 1, as the JIT
    specialises it."""
    f = "*fp32"
    logits_common = dict(
        hidden_ptr=f"*{dt}", weight_ptr=f"*{dt}", bias_ptr=f"*{dt}", targets_ptr="*i64",
        n_tokens="i32", hidden_size="i32D", stride_hn="i32D", stride_hh=1, stride_wv="i32D", stride_wh=1,
        inv_temperature="fp32", HAS_BIAS=True, DOT_FP32=dt == "fp32", DOT_IEEE=ieee)
    dz_t = "*bf16" if dt == "bf16" else "*fp32"
    fwd = dict(logits_common, m_ptr=f, s_ptr=f, t_ptr=f, x_ptr=f, vocab_size="i32D", tiles_per_split="i32",
               n_splits="i32", WITH_ENTROPY=True)
    bwd = dict(logits_common, lse_ptr=f, ent_ptr=f, glogp_ptr=f, gent_ptr=f, dz_ptr=dz_t, flags_ptr="*i8",
               vocab_begin="i32D", vocab_end="i32D", n_vtiles="i32", stride_dzn="i32D", stride_fn="i32",
               filter_eps="fp32", HAS_GRAD_ENT=True, FILTER=False)
    bwd_filter = dict(bwd, FILTER=True)
    # fp16: fp32 dlogits x fp16 -> TF32. Filter flags: one per 128 x 128 block, as the sm_90/100 pinned tiles
    mm_flags = dict(DOT_FP32=dt != "bf16", DOT_IEEE=ieee, flags_ptr="*i8", flag_rows="i32",
                    flag_cols="i32", FILTER=False, FLAG_M=128, FLAG_K=128, FLAG_RM=1, FLAG_RK=1)
    grad_h = dict(a_ptr=dz_t, b_ptr=f"*{dt}", c_ptr=f, M="i32D", N="i32D", K="i32D", stride_am="i32D", stride_ak=1,
                  stride_bk="i32D", stride_bn=1, stride_cm="i32D", stride_cn=1, ACCUMULATE=True, stride_fm="i32",
                  stride_fk=1, **mm_flags)
    grad_w = dict(a_ptr=dz_t, b_ptr=f"*{dt}", c_ptr=f"*{dt}", M="i32D", N="i32D", K="i32D", stride_am=1,
                  stride_ak="i32D", stride_bk="i32D", stride_bn=1, stride_cm="i32D", stride_cn=1, ACCUMULATE=False,
                  stride_fm=1, stride_fk="i32", **mm_flags)
    merge = dict(m_ptr=f, s_ptr=f, t_ptr=f, x_ptr=f, logp_ptr=f, lse_ptr=f, ent_ptr=f, n_tokens="i32",
                 n_splits="i32", WITH_ENTROPY=True)
    epi = dict(logp_ptr=f, old_ptr=f, adv_ptr=f, cu_ptr="*i32", div_ptr=f, nseq_ptr=f, delta_ptr=f, term_ptr=f,
               gtok_ptr=f, tau="fp32")
    sexp = dict(z_ptr=f, bias_ptr=f"*{dt}", targets_ptr="*i64", e_ptr=dz_t, logp_ptr=f, inv_s_ptr=f,
                n_rows="i32", vocab_size="i32D", stride_zn="i32D", stride_en="i32D", inv_temperature="fp32",
                HAS_BIAS=True, SHIFT_LIM=SHIFT_LIMIT)
    tc = not ieee           # exact fp32 (FMA) dots by design: no tensor-core requirement
    f32 = dt == "fp32"
    return [("logits_fwd", _logits_fwd_kernel, "logits_fwd", fwd, tc, f32),
            ("logits_bwd", _dlogits_kernel, "logits_bwd", bwd, tc, f32),
            ("logits_bwd_filter", _dlogits_kernel, "logits_bwd", bwd_filter, tc, f32),
            ("merge", _merge_kernel, "merge", merge, False, False),
            ("matmul_grad_hidden", _matmul_kernel, "matmul", grad_h, tc, dt != "bf16"),
            ("matmul_grad_weight", _matmul_kernel, "matmul", grad_w, tc, dt != "bf16"),
            ("matmul_grad_hidden_filter", _matmul_kernel, "matmul", dict(grad_h, FILTER=True), tc, dt != "bf16"),
            ("matmul_grad_weight_filter", _matmul_kernel, "matmul", dict(grad_w, FILTER=True), tc, dt != "bf16"),
            ("pmd_epilogue", _pmd_epilogue_kernel, "pmd_epilogue", epi, False, False),
            ("shifted_exp", _shifted_exp_kernel, "shifted_exp", sexp, False, False)]


def _source(kern, args: dict, cfg: configs.Config) -> ASTSource:
    fn = kern                      # a JITFunction: the report runs without TRITON_INTERPRET
    values = {**args, **cfg.blocks}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name not in values:
            raise KeyError(f"kernels-report: no value for argument {name} of {fn.__name__}")
        v = values[name]
        if isinstance(v, str) and (v.startswith("*") or v in ("i32", "i32D", "fp32")):
            signature[name] = "i32" if v == "i32D" else v
            if v.startswith("*") or v == "i32D":
                attrs[(i,)] = DIVISIBLE_BY_16
        else:
            signature[name] = "constexpr"
            constexprs[name] = v
    return ASTSource(fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _inspect(cubin: Path) -> dict:
    usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True,
                           text=True, check=True).stdout
    sass = subprocess.run([_tool("nvdisasm"), str(cubin)], capture_output=True, text=True, check=True).stdout
    get = lambda key: int(m.group(1)) if (m := re.search(rf"\b{key}:(\d+)", usage)) else -1  # noqa: E731
    ops = [ln.split(";")[0] for ln in sass.splitlines()]
    count = lambda pat: sum(1 for ln in ops if re.search(pat, ln))  # noqa: E731
    return {"registers": get("REG"), "stack_bytes": get("STACK"), "local_bytes": get("LOCAL"),
            "hgmma": count(r"\bHGMMA\."), "mma": count(r"\bHMMA\."), "utchmma": count(r"\bUTCHMMA\b"),
            "local_loads": count(r"\bLDL(\.|\s)"), "local_stores": count(r"\bSTL(\.|\s)")}


def report(arch: int, out: Path, dtypes=("bf16",), all_configs: bool = False) -> list[dict]:
    """Compile every kernel variant x pinned config (all candidates with all_configs) for sm_<arch>."""
    out.mkdir(parents=True, exist_ok=True)
    fam = family_of_capability(arch)
    rows = []
    for dt in dtypes:
        ieee = dt == "fp32-ieee"
        for name, kern, cname, args, has_tiles, fp32_ops in _variants(_OPERAND_DTYPES[dt], ieee):
            cfam = configs.family(cname, fam, torch.float32 if dt.startswith("fp32") else None, ieee)
            cands = configs.CONFIGS[cname][cfam]
            for ci, cfg in enumerate(cands if all_configs else cands[:1]):
                meta = cfg.meta(fp32_ops)
                row = {"kernel": name, "dtype": dt, "arch": f"sm_{arch}", "config": ci, **meta}
                stem = f"{name}_{dt}_sm{arch}_cfg{ci}"
                t0 = time.time()
                try:
                    ck = triton.compile(_source(kern, args, cfg), target=GPUTarget("cuda", arch, 32),
                                        options={"num_warps": meta["num_warps"], "num_stages": meta["num_stages"]})
                    (out / f"{stem}.cubin").write_bytes(ck.asm["cubin"])
                    (out / f"{stem}.ptx").write_text(ck.asm["ptx"])
                    row.update(_inspect(out / f"{stem}.cubin"), shared_bytes=int(ck.metadata.shared),
                               compiled=True)
                except Exception as e:  # noqa: BLE001 - a failed compile is a reported failure
                    row.update(compiled=False, error=f"{type(e).__name__}: {str(e)[:500]}")
                row["compile_s"] = round(time.time() - t0, 2)
                row["failures"] = _failures(row, arch, has_tiles)
                rows.append(row)
    (out / "report.json").write_text(json.dumps(rows, indent=1))
    return rows


def _failures(row: dict, arch: int, has_tiles: bool) -> list[str]:
    if not row.get("compiled"):
        return ["does not compile"]
    bad = []
    if row["stack_bytes"] > 0 or row["local_bytes"] > 0 or row["local_loads"] or row["local_stores"]:
        bad.append("spills (stack/local memory)")
    if row["shared_bytes"] > SMEM_LIMIT[arch]:
        bad.append(f"shared memory {row['shared_bytes']} > {SMEM_LIMIT[arch]}")
    if has_tiles and row[tc_key(arch)] == 0:
        bad.append(f"matrix tiles do not use tensor cores ({TC_OP[arch]})")
    return bad


def tc_key(arch: int) -> str:
    """The report column counting arch's tensor-core instruction."""
    return {"HMMA": "mma", "HGMMA": "hgmma", "UTCHMMA": "utchmma"}[TC_OP[arch]]


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="fastpmd kernels-report", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, action="append", choices=list(ARCHS),
                   help="compute capability to compile for (repeatable; default 90)")
    p.add_argument("--out", required=True, type=Path,
                   help="output directory: DIR/sm_<arch>/ gets the cubins, PTX and report.json")
    p.add_argument("--dtype", action="append", choices=sorted(_OPERAND_DTYPES), help="operand dtype (default bf16)")
    p.add_argument("--all-configs", action="store_true", help="also compile the autotuning candidates")
    a = p.parse_args(argv)
    try:
        check_out_dir("--out", a.out)
    except ValueError as e:
        print(f"fastpmd kernels-report: error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("fastpmd kernels-report: error: unset TRITON_INTERPRET (the report compiles for the GPU)", file=sys.stderr)
        return 2
    ok = True
    for arch in a.arch or [90]:
        rows = report(arch, a.out / f"sm_{arch}", tuple(a.dtype or ["bf16"]), a.all_configs)
        print(f"{'kernel':20s} {'dtype':5s} {'arch':6s} cfg {'regs':>4s} {'smem':>7s} {'stack':>5s} "
              f"{'TC ops':>6s} {'LDL/STL':>7s}  status")
        for r in rows:
            tc = r.get(tc_key(arch), "-")
            ldl = f"{r.get('local_loads', '-')}/{r.get('local_stores', '-')}"
            status = "ok" if not r["failures"] else "FAIL: " + "; ".join(r["failures"])
            print(f"{r['kernel']:20s} {r['dtype']:5s} {r['arch']:6s} {r['config']:3d} {r.get('registers', '-'):>4} "
                  f"{r.get('shared_bytes', '-'):>7} {r.get('stack_bytes', '-'):>5} {tc:>6} {ldl:>7}  {status}")
            ok = ok and not r["failures"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
