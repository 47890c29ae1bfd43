"""The merged norm-forward and column-sum kernels (kernels.py) against the kernels they replaced,
read from an older commit: the same bits in every caller's form. JSON out.

    python scripts/check_kernel_merge.py                      # on the GPU: outputs, bit for bit
    TRITON_INTERPRET=1 python scripts/check_kernel_merge.py   # the same on the CPU, small shapes
    python scripts/check_kernel_merge.py --sass               # no GPU needed: sm_90 SASS compared

The old wrappers (``kernels.res_relu_ln_fwd`` / ``col_sum``, ``phase1_kernels.ln_fwd`` /
``col_acc`` of ``--rev``, default 5e3fe8c, the last commit with the separate kernels) are
loaded from ``git show`` into a temporary folder. Forms: the layers' (z contiguous, y16 a column
slice of a wider buffer, with and without the bias, z bf16 or fp32) and phase 1's (z a column
slice of the (n, L*C) buffer, y16 contiguous), widths of the shipped spaces and odd ones.

``--sass`` compiles both for sm_90 through Triton's own JIT binder (the specialisation a launch
would get) with the driver replaced by one that reports an sm_90 target and launches nothing,
and compares the SASS with the parameters' constant-bank offsets masked (the argument lists
differ). Equal SASS runs the same instructions: the same bits on an H100/H200.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def load_old(rev: str, into: Path):
    """The old kernels' two modules from ``rev`` (a commit, or a folder holding that commit's tree:
    a machine without the repository's history), importable as old_kernels / old_phase1_kernels."""
    if Path(rev).is_dir():
        show = lambda p: (Path(rev) / p).read_text()  # noqa: E731
    else:
        show = lambda p: subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{p}"], check=True, capture_output=True, text=True).stdout  # noqa: E731
    (into / "old_kernels.py").write_text(show("archsearch/cvfp/fast/kernels.py"))
    p1 = show("archsearch/cvfp/fast/phase1_kernels.py").replace("from archsearch.cvfp.fast.kernels import", "from old_kernels import")
    (into / "old_phase1_kernels.py").write_text(p1)
    sys.path.insert(0, str(into))
    import old_kernels
    import old_phase1_kernels

    return old_kernels, old_phase1_kernels


def cases(widths, n: int):
    """(name, old call, new call) for every caller form; each call returns the tensors it wrote."""
    import torch

    from archsearch.cvfp.fast import kernels as NK
    from archsearch.cvfp.fast import phase1_kernels as NP

    OK, OP = OLD
    dev = DEVICE
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s, dtype=torch.float32: torch.randn(*s, generator=g, device=dev).to(dtype)  # noqa: E731
    for D in widths:
        r, gm, bt, zb = rnd(n, D), rnd(D), rnd(D), rnd(D)
        for zdt in (torch.bfloat16, torch.float32):
            z = rnd(n, D, dtype=zdt)
            for bias in (zb, None):
                for with16 in (False, True):

                    def layers(mod, z=z, bias=bias, with16=with16, zdt=zdt, D=D, r=r, gm=gm, bt=bt):
                        packed = torch.zeros(n, 2 * D, device=dev, dtype=zdt)
                        y, mean, rstd = mod.res_relu_ln_fwd(z, r, gm, bt, 1e-5, bias, packed[:, D:] if with16 else None)
                        return [y, mean, rstd, packed]

                    yield (f"res_relu_ln_fwd D={D} z={str(zdt)[6:]} bias={bias is not None} y16={with16}",
                           lambda f=layers: f(OK), lambda f=layers: f(NK))  # fmt: skip
            for L in (1, 3):
                Z = rnd(n, L * D, dtype=zdt)
                for i in range(L):
                    for with16 in (False, True):

                        def phase1(mod, zs=Z[:, i * D : (i + 1) * D], with16=with16, zdt=zdt, D=D, r=r, gm=gm, bt=bt, zb=zb):
                            y, mean, rstd = (torch.zeros(n, D, device=dev), torch.zeros(n, device=dev), torch.zeros(n, device=dev))
                            y16 = torch.zeros(n, D, device=dev, dtype=zdt) if with16 else None
                            mod.ln_fwd(zs, zb, r, gm, bt, 1e-5, y, y16, mean, rstd)
                            return [y, mean, rstd] + ([y16] if with16 else [])

                        yield f"ln_fwd D={D} z={str(zdt)[6:]} L={L} layer={i} y16={with16}", lambda f=phase1: f(OP), lambda f=phase1: f(NP)
    for P in (1, 37, 528):
        for W in sorted({3 * widths[0], 3 * widths[-1], 2304}):
            x, o = rnd(P, W), rnd(W)

            def acc(mod, x=x, o=o):
                out = o.clone()
                mod.col_acc(x, out)
                return [out]

            yield f"col_sum P={P} W={W}", lambda x=x: [OK.col_sum(x)], lambda x=x: [NK.col_sum(x)]
            yield f"col_acc P={P} W={W}", lambda f=acc: f(OP), lambda f=acc: f(NP)


def compare_outputs(widths, n: int) -> dict:
    import torch

    out = {}
    for name, old, new in cases(widths, n):
        a, b = old(), new()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        out[name] = all(torch.equal(u, v) for u, v in zip(a, b))
    return out


def compare_sass(widths, n: int) -> dict:
    """SASS of each old and new launch, compiled for sm_90 without a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class CompileOnly:  # an sm_90 target that launches nothing
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def is_active(self):
            return True

    driver.set_active(CompileOnly())
    compiled = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        compiled.append(run(self, *args, grid=grid, warmup=True, **kwargs))
        return compiled[-1]

    JITFunction.run = compile_only
    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"

    def sass(kernel) -> str:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            text = subprocess.run([str(cuobjdump), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        lines = [m.group(1) for m in (re.match(r"\s*/\*[0-9a-f]{4}\*/\s*(.*?);", ln) for ln in text.splitlines()) if m]
        return re.sub(r"c\[0x0\]\[0x[0-9a-f]+\]", "c[0x0][param]", "\n".join(lines))

    out = {}
    for name, old, new in cases(widths, n):
        old()
        a = sass(compiled[-1])
        new()
        out[name] = a == sass(compiled[-1])
    return out


def main() -> None:
    global OLD, DEVICE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="5e3fe8c", help="the commit with the old kernels, or a folder with its tree")
    ap.add_argument("--sass", action="store_true", help="compare sm_90 SASS (no GPU needed)")
    ap.add_argument("--out", default=None, help="JSON file (default: stdout only)")
    args = ap.parse_args()
    import torch

    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if args.sass:
        DEVICE, widths, n = torch.device("cpu"), [24, 100, 384, 768, 1152, 2048], 4096
    elif interpret:
        DEVICE, widths, n = torch.device("cpu"), [5, 24, 100], 33
    else:
        DEVICE, widths, n = torch.device("cuda"), [24, 100, 384, 768, 1152, 2048], 70_000
    with tempfile.TemporaryDirectory() as tmp:
        OLD = load_old(args.rev, Path(tmp))
        equal = compare_sass(widths, n) if args.sass else compare_outputs(widths, n)
    report = {"rev": args.rev, "mode": "sass" if args.sass else "interpreter" if interpret else torch.cuda.get_device_name(),
              "cases": len(equal), "differing": [k for k, v in equal.items() if not v]}  # fmt: skip
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(dict(report, equal=equal), indent=1) + "\n")
    sys.exit(1 if report["differing"] else 0)


OLD = DEVICE = None

if __name__ == "__main__":
    main()
