"""What every kernel compiles to on sm_90, before and after a change, without a GPU.

    python benchmarks/kernel_report.py --before 6165c67            # writes benchmarks/results/kernels-sm90.md

For each source tree (the git revision --before, extracted with git archive, and this checkout):
- CUDA: every csrc/cuda/*.cu compiled alone by nvcc to an sm_90 cubin with the extension's flags;
  cuobjdump -res-usage gives registers, stack, local and shared bytes per kernel, nvdisasm the SASS.
- Triton: the tree's own compile gate (ddpm_fast.triton.compile_gate) on a representative plan per kernel
  variant, each launch's cubin disassembled the same way and its PTX searched for the MMA kind.
From the SASS, per kernel: static instructions; the hot loop (the largest loop, found from backward
branches; for grid-stride kernels the grid-stride loop) with the body of each subroutine it calls
(the 64-bit divide, the slow path of sinf/cosf) counted once per call site; that loop's count per
element, where ELEMENTS below says how many elements one pass handles; and the loop's CALL, MUFU,
tensor-core (HMMA, HGMMA = wgmma) and shared-memory load (LDS, LDSM = ldmatrix) instructions, and
its global loads and stores by width (LDGSTS = cp.async).  A kernel with no loop is counted whole.
These are static counts from the compiled code: a path the data never takes counts too.  They are
not speeds: benchmarks/ measures those on a GPU.
Needs nvcc (CUDA_HOME or /usr/local/cuda), the CUDA build of torch, and triton (its nvdisasm and
cuobjdump).  Takes some minutes: one nvcc per file and tree, one Triton compile per plan.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
ARCH = 90

# Elements one thread handles in one pass of the hot loop (or in the whole kernel, for a kernel with
# no loop): CUDA kernels by a pattern on the demangled name, with the element size of its dtype;
# Triton kernels from the constexprs of their launch (a program's elements, over its threads).  A
# kernel not listed reports no per-element figure.
_SIZE = {"float": 4, "Half": 2, "BFloat16": 2}
_WIDTH = {1: "U8", 2: "U16", 4: "32", 8: "64", 16: "128"}  # LDG/STG suffix by access bytes


def _cuda_elements(name: str, source: str) -> tuple:
    """(elements per hot-loop pass, whether the whole kernel is the pass, the data access that marks the
    hot loop) of a CUDA kernel, from its demangled name and its file's source.  The elements may be a
    function of the hot loop's op counts."""
    m = re.search(r"<(float|Half|BFloat16)", name)
    size = _SIZE[m.group(1)] if m else 4
    vector = re.search(r", (\d+)>$", name)  # the GroupNorm kernels' V: values per access
    v = int(vector.group(1)) if vector else 1
    for pattern, elements, whole, kind in CUDA_ELEMENTS:
        if re.search(pattern, name):
            return elements(size, v, source), whole, f"{kind}.{_WIDTH[v * size]}" if kind else None
    return None, False, None


def _accesses(kind: str, size: int, v: int, per_element: int = 1):
    """Elements per pass counted from the loop's data accesses: the compiler unrolls the GroupNorm walks
    (4 values a pass at V = 1, not 1), so V values per LDG or STG of V * size bytes, over the data
    tensors each value takes (per_element).  None where a float32 scalar access can't be told from
    fp32 per-channel parameters and partial sums."""
    if v * size == 4:
        return None
    return lambda ops: v * ops.get(f"{kind}.{_WIDTH[v * size]}", 0) / per_element or None


CUDA_ELEMENTS = [  # (name pattern, elements per pass, whole kernel, the access marking the hot loop)
    # A thread's 16 bytes per pass (one or two Philox groups).
    (r"^(p_step|q_sample)_contiguous", lambda size, v, src: 16 // size, False, None),
    # channels_last: a Philox group's (up to) 4 elements per item since channels_last.h, one before.
    (r"^(p_step|q_sample)_channels_last", lambda size, v, src: 4 if "channels_last.h" in src else 1, False, None),
    (r"^philox_randn_kernel", lambda size, v, src: 4, False, None),
    # A thread's Philox group (4 elements) at one window position per pass.
    (r"^picard_kernel", lambda size, v, src: 4, False, None),
    # The on-chip GroupNorm caches kCache = 16 values a thread, loops unrolled: the whole kernel.
    (r"^gn_onchip", lambda size, v, src: 16, True, None),
    # The GroupNorm walks: the values they store (y, dx), or load (x; x and dy in gnb_sums).
    (r"^(gn_norm|gn_rows_norm|gnb_dx)\b", lambda size, v, src: _accesses("STG", size, v), False, "STG"),
    (r"^(gn_stats|gn_rows_stats)\b", lambda size, v, src: _accesses("LDG", size, v), False, "LDG"),
    (r"^gnb_sums\b", lambda size, v, src: _accesses("LDG", size, v, 2), False, "LDG"),
]

TRITON_ELEMENTS = {
    "_philox_randn_kernel": lambda k: 4 * k["BLOCK"],
    "_q_sample_kernel": lambda k: 4 * k["BLOCK"] if "BLOCK" in k else 4 * k["BLOCK_Q"] * k["BLOCK_C"],
    "_p_step_kernel": lambda k: 4 * k["BLOCK"] if "BLOCK" in k else 4 * k["BLOCK_Q"] * k["BLOCK_C"],
    "_picard_kernel": lambda k: 4 * k["BLOCK"],
    "_gn_onchip": lambda k: k["BLOCK_HW"] * k["BLOCK_C"],
    "_gn_stats": lambda k: k["BLOCK_HW"] * k["BLOCK_C"],
    "_gn_norm": lambda k: k["BLOCK_HW"] * k["BLOCK_C"],
    "_gnb_onchip": lambda k: k["BLOCK_HW"] * k["BLOCK_C"],
    "_gnb_sums": lambda k: k["BLOCK_HW"] * k["BLOCK_C"],
    "_gnb_dx": lambda k: k["BLOCK_HW"] * k["BLOCK_C"],
}

# The Triton plans the report compiles: one per kernel variant (dtype, layout, path, head size), picked
# from the compile gate's plans by (op, label pattern).
TRITON_PLANS = [
    ("philox_randn", r"^\w+ b4x3x32x32$"),
    ("q_sample", r"^\w+ \w+ noise=seed return_noise=False$"),
    ("p_step", r"^\w+ \w+ noise=seed prediction=0 variance=(0|2) form=0 clip=True$"),
    ("picard_step", r"^(float32 prediction=0 variance=0 form=0 clip=True|\w+ variance=0)$"),
    ("group_norm", r"^\w+ 2x128x32x32 G=32 \w+ split=(1|4) bias\+silu\+weight$"),
    ("group_norm_backward", r"^\w+ 2x128x32x32 G=32 \w+ split=(1|4) bias\+silu\+weight$"),
    ("attention", r"^\w+ d=(16|32|64|128|256) L=64 H=2$"),
]

HOT_FRACTION = 0.1
COUNTED = ("CALL", "MUFU", "HMMA", "HGMMA", "LDS", "LDSM", "LDGSTS", "SHFL", "BAR")


# ------------------------------------------------------------------------------------------ SASS
def _tool(name: str) -> str:
    """nvdisasm / cuobjdump: the toolkit's, else the copy triton ships."""
    found = shutil.which(name)
    if found:
        return found
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise RuntimeError(f"{name} not found on PATH nor in triton's backends/nvidia/bin")
    return str(path)


_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+|\$[\w$]+):\s*$")  # branch targets and subroutines
_TARGET = re.compile(r"`\(([^)]+)\)")


def parse_sass(text: str) -> Dict[str, List[tuple]]:
    """nvdisasm -c output -> {function: [(address, opcode, operands, label at this address or None)]}."""
    functions: Dict[str, List[tuple]] = {}
    current: Optional[List[tuple]] = None
    pending: List[str] = []
    for line in text.splitlines():
        head = re.match(r"^\s*\.text\.(\S+):", line) or re.match(r"^//-+ \.text\.(\S+)\s+-+", line)
        if head:
            current = functions.setdefault(head.group(1), [])
            pending = []
            continue
        if current is None:
            continue
        lab = _LABEL.match(line)
        if lab:
            pending.append(lab.group(1))
            continue
        ins = _INSN.search(line)
        if ins:
            body = re.sub(r"^@!?U?P\w+\s+", "", ins.group(2))  # drop the predicate guard
            opcode = body.split()[0] if body.split() else ""
            current.append((int(ins.group(1), 16), opcode, body, tuple(pending)))
            pending = []
    return functions


def _access(opcode: str) -> Optional[str]:
    """LDG.E.128 -> LDG.128, STG.E.U16 -> STG.U16, LDG.E -> LDG.32; None for other opcodes."""
    base = opcode.split(".")[0]
    if base not in ("LDG", "STG"):
        return None
    width = re.search(r"\.(128|64|U16|S16|U8|16|32)\b", opcode)
    return f"{base}.{width.group(1) if width else '32'}"


def sass_stats(insns: List[tuple], elements, whole: bool = False, access: Optional[str] = None) -> dict:
    """Static counts for one function (see the module docstring); elements: per pass, or a function
    of the hot loop's op counts that gives them; whole: count the whole kernel; access: the hot loop
    is one that makes this global access (e.g. STG.128: a walk over the data, not a wider loop that
    gathers partial sums before it)."""
    insns = [i for i in insns if i[1] != "NOP"]
    index_of = {lab: k for k, ins in enumerate(insns) for lab in ins[3]}
    # Subroutines: CALL.REL targets inside the function, from the label to the next RET.
    def callee_length(label: str) -> int:
        start = index_of.get(label)
        if start is None:
            return 0
        for k in range(start, len(insns)):
            if insns[k][1].startswith("RET"):
                return k - start + 1
        return 0

    loops = []
    for k, (_, opcode, body, _) in enumerate(insns):
        target = _TARGET.search(body)
        if opcode.startswith("BRA") and target and index_of.get(target.group(1), k + 1) <= k:
            loops.append((index_of[target.group(1)], k))
    # The hot loop: the widest backward branch (the grid-stride loop holds the others), unless it is a
    # small loop on a side path (the range reduction of sinf/cosf for huge arguments).
    def accesses(lo):
        return sum(_access(i[1]) == access for i in insns[lo[0]:lo[1] + 1])

    marked = [lo for lo in loops if access and accesses(lo)]
    if marked:
        # The innermost loops that make the access (not one around them that also reloads per-channel
        # coefficients), and of those the one making the most (an unrolled body, not its remainder).
        inner = [lo for lo in marked if not any(o != lo and lo[0] <= o[0] and o[1] <= lo[1] for o in marked)]
        loops = [max(inner, key=lambda lo: (accesses(lo), lo[1] - lo[0]))]
    hot = max(loops, key=lambda lo: lo[1] - lo[0], default=None)
    if hot and (whole or (not marked and hot[1] - hot[0] + 1 < HOT_FRACTION * len(insns))):
        hot = None
    body = insns[hot[0]:hot[1] + 1] if hot else [i for i in insns if not i[1].startswith("RET")]
    if not hot:  # a loop-free kernel: drop the subroutines after its last EXIT and the trailing BRA
        exits = [k for k, i in enumerate(insns) if i[1] == "EXIT"]
        body = insns[:exits[-1] + 1] if exits else insns
    count = len(body)
    calls = [_TARGET.search(i[2]) for i in body if i[1].startswith("CALL")]
    count += sum(callee_length(c.group(1)) for c in calls if c)
    ops: Dict[str, int] = {}
    for _, opcode, text, _ in body:
        base = opcode.split(".")[0]
        if base in COUNTED:
            ops[base] = ops.get(base, 0) + 1
        if base in ("LDG", "STG"):
            key = _access(opcode)
            ops[key] = ops.get(key, 0) + 1
    if callable(elements):
        elements = elements(ops)
    return dict(instructions=len(insns), loop=bool(hot), hot_instructions=count, elements=elements,
                per_element=round(count / elements, 1) if elements else None, ops=ops)


def _res_usage(text: str) -> Dict[str, dict]:
    out, name = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and name:
            out[name] = dict(registers=int(m.group(1)), stack=int(m.group(2)), shared=int(m.group(3)),
                             local=int(m.group(4)))
    return out


def _demangle(names: List[str]) -> Dict[str, str]:
    if not names or not shutil.which("c++filt"):
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out))


def _short(demangled: str) -> str:
    """ddpm_fast::(anonymous namespace)::p_step_contiguous<c10::Half, true>(...) -> p_step_contiguous<Half, true>"""
    name = demangled.replace("(anonymous namespace)::", "").replace("ddpm_fast::", "").replace("c10::", "")
    return name.split("(")[0].replace("void ", "")


# ------------------------------------------------------------------------------------------ CUDA
def _nvcc() -> str:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return str(Path(home) / "bin" / "nvcc")


def cuda_records(tree: Path, work: Path) -> List[dict]:
    os.environ.setdefault("CUDA_HOME", str(Path(_nvcc()).parent.parent))  # for torch's include paths
    from torch.utils.cpp_extension import include_paths

    sources = sorted((tree / "csrc" / "cuda").glob("*.cu"))
    flags = ["-O3", "-lineinfo", "-std=c++20", f"-arch=sm_{ARCH}", "-cubin", f"-I{tree / 'csrc' / 'include'}",
             "-DTORCH_EXTENSION_NAME=_C", "-D_GLIBCXX_USE_CXX11_ABI=1"] + [f"-I{p}" for p in include_paths("cuda")]

    def build(src: Path) -> Path:
        cubin = work / f"{src.stem}.cubin"
        run = subprocess.run([_nvcc(), *flags, str(src), "-o", str(cubin)], capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"nvcc failed on {src}:\n{run.stderr[-3000:]}")
        return cubin

    with ThreadPoolExecutor(max(1, min(len(sources), os.cpu_count() or 1))) as pool:
        cubins = list(pool.map(build, sources))
    records = []
    for src, cubin in zip(sources, cubins):
        usage = _res_usage(subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True,
                                          text=True, check=True).stdout)
        sass = parse_sass(subprocess.run([_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                                         check=True).stdout)
        names = _demangle(sorted(usage))
        for mangled in sorted(usage):
            if mangled not in sass:
                continue
            name = _short(names[mangled])
            records.append(dict(file=src.name, kernel=name, **usage[mangled],
                                **sass_stats(sass[mangled], *_cuda_elements(name, src.read_text()))))
    return records


# ---------------------------------------------------------------------------------------- Triton
def triton_records(tree: Path, work: Path) -> List[dict]:
    """The tree's compile gate, run in a subprocess whose import path starts at the tree."""
    out = work / "triton.json"
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{ROOT / 'benchmarks'}")
    env.pop("TRITON_INTERPRET", None)
    subprocess.run([sys.executable, "-c", "import kernel_report; kernel_report._triton_worker()", str(out)],
                   env=env, check=True, cwd=work)
    return json.loads(out.read_text())


def _triton_worker() -> None:
    """In the subprocess: wrap the gate's worker so each compiled kernel also yields SASS counts."""
    from ddpm_fast.triton import compile_gate as gate

    gate_init, gate_compile = gate._init_worker, gate._compile

    def init(arch, cache):
        gate_init(arch, cache)
        from triton.runtime.jit import JITFunction

        warm_up = JITFunction.run

        def run(self, *args, **kwargs):
            gate._WORKER.setdefault("constexprs", []).append(
                {k: v for k, v in kwargs.items() if isinstance(v, int) and not isinstance(v, bool)})
            return warm_up(self, *args, **kwargs)

        JITFunction.run = run

    def compile_plan(job):
        gate._WORKER["constexprs"] = []
        records = gate_compile(job)
        for record, (name, kernel, _), consts in zip(records, gate._WORKER["compiled"], gate._WORKER["constexprs"]):
            if not record["ok"]:
                continue
            path = Path(tempfile.mkstemp(suffix=".cubin")[1])
            path.write_bytes(kernel.asm["cubin"])
            sass = parse_sass(subprocess.run([_tool("nvdisasm"), "-c", str(path)], capture_output=True, text=True,
                                             check=True).stdout)
            path.unlink()
            # SASS is one thread's code: elements per thread.
            threads = 32 * kernel.metadata.num_warps
            elements = TRITON_ELEMENTS[name](consts) / threads if name in TRITON_ELEMENTS else None
            ptx = kernel.asm["ptx"]
            record.update(sass_stats(next(iter(sass.values())), elements), constexprs=consts,
                          wgmma=len(re.findall(r"wgmma\.mma_async", ptx)), mma_sync=len(re.findall(r"\bmma\.sync", ptx)))
        return records

    init.__module__ = compile_plan.__module__ = gate.__name__
    init.__qualname__, compile_plan.__qualname__ = "_init_worker", "_compile"
    gate._init_worker, gate._compile = init, compile_plan
    chosen = [(op, re.compile(pattern)) for op, pattern in TRITON_PLANS]
    plans = gate.all_plans
    gate.all_plans = lambda only=None: [p for p in plans(only) if any(op == p.op and rx.search(p.label)
                                                                        for op, rx in chosen)]
    records = gate.run_gate((ARCH,), None, 0)
    Path(sys.argv[1]).write_text(json.dumps(records))


# ---------------------------------------------------------------------------------------- report
def _tree_at(rev: str, work: Path) -> Path:
    archive = work / "src.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), rev, "csrc", "ddpm_fast"], check=True)
    dest = work / "tree"
    with tarfile.open(archive) as tar:
        tar.extractall(dest)
    return dest


def collect(tree: Path) -> dict:
    with tempfile.TemporaryDirectory() as work:
        return dict(cuda=cuda_records(tree, Path(work)), triton=triton_records(tree, Path(work)))


def _ops(r: dict) -> str:
    return " ".join(f"{k}:{v}" for k, v in sorted(r.get("ops", {}).items())) or "-"


def _row(r: Optional[dict]) -> List[str]:
    if r is None:
        return ["(absent)"] + [""] * 6
    spill = r.get("local", r.get("spill_bytes", 0))
    return [str(r["registers"]), str(spill), str(r.get("stack", "")), str(r.get("shared", r.get("shared_bytes", ""))),
            f"{r['hot_instructions']}{'' if r['loop'] else ' (no loop)'}",
            "" if r["per_element"] is None else str(r["per_element"]), _ops(r)]


def markdown(before: dict, after: dict, rev: str, head: str) -> str:
    lines = [f"# Compiled kernels on sm_{ARCH}: before ({rev}) and after ({head})", "",
             "Generated by `python benchmarks/kernel_report.py --before " + rev + "`: static counts from the "
             "compiled code (ptxas/nvcc for sm_90, nvdisasm), not speeds.  **hot** = SASS instructions in the hot "
             "loop (the widest loop; the whole kernel when it has none), each subroutine it calls counted once per "
             "call site; **/elem** = hot / the elements one pass handles; **spill** = local memory bytes (CUDA) or "
             "ptxas spill bytes (Triton); ops are counted in the hot loop.  A kernel with run-time options carries the "
             "code of each (nvcc specialises p_step's step math per option): its count sums the paths, of which a "
             "launch runs one.  A kernel renamed by the change (the GroupNorm kernels, now templated on layout and "
             "vector width) shows its old name as absent after, and its new names absent before.", ""]
    header = ("| kernel | | regs | spill | stack | shared | hot | /elem | ops in the hot loop |\n"
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for file in sorted({r["file"] for r in before["cuda"] + after["cuda"]}):
        lines += ["", f"## CUDA: csrc/cuda/{file}", "", header]
        b = {r["kernel"]: r for r in before["cuda"] if r["file"] == file}
        a = {r["kernel"]: r for r in after["cuda"] if r["file"] == file}
        for name in sorted(set(b) | set(a)):
            for tag, rec in (("before", b.get(name)), ("after", a.get(name))):
                if rec is not None or tag == "after":
                    lines.append("| " + " | ".join([f"`{name}`", tag] + _row(rec)) + " |")
    lines += ["", "## Triton (one plan per variant from ddpm_fast.triton.compile_gate)", "",
              "| op / kernel | plan | | warps | regs | spill | shared | hot | /elem | wgmma | mma.sync | ops |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    key = lambda r: (r["op"], r["kernel"], r["label"])  # noqa: E731
    b = {key(r): r for r in before["triton"]}
    a = {key(r): r for r in after["triton"]}
    for k in sorted(set(b) | set(a)):
        for tag, rec in (("before", b.get(k)), ("after", a.get(k))):
            if rec is None and tag == "before":
                continue
            if rec is None or not rec["ok"]:
                cells = ["(absent)" if rec is None else f"failed: {rec['error']}"] + [""] * 8
            else:
                cells = [str(rec["num_warps"]), str(rec["registers"]), str(rec["spill_bytes"]), str(rec["shared_bytes"]),
                         f"{rec['hot_instructions']}{'' if rec['loop'] else ' (no loop)'}",
                         "" if rec["per_element"] is None else str(rec["per_element"]), str(rec["wgmma"]),
                         str(rec["mma_sync"]), _ops(rec)]
            lines.append(f"| {k[0]} `{k[1]}` | {k[2]} | {tag} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="git revision of the 'before' sources")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / f"kernels-sm{ARCH}.md"))
    args = p.parse_args(argv)
    # The after tree is the checkout as it is: a report made before its change is committed names
    # the commit it changes, marked so, not one that does not exist yet.
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    changed = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no", "--", "csrc", "ddpm_fast"],
                             capture_output=True, text=True).stdout.strip()
    head = f"{head} with uncommitted changes" if head and changed else head or "working tree"
    with tempfile.TemporaryDirectory() as work:
        before = collect(_tree_at(args.before, Path(work)))
    after = collect(ROOT)
    out = Path(args.out)
    out.write_text(markdown(before, after, args.before, head))
    out.with_suffix(".json").write_text(json.dumps(dict(before=before, after=after), indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
