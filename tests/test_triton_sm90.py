"""The Hopper static gate (scripts/check_triton_sm90.py): every Triton kernel configuration the
dispatch launches, compiled for sm_90a down to SASS with no GPU, must not spill, must fit in shared
memory, must run its bf16/fp16 dots on wgmma and must keep GPU-scope fences out of its loops;
bench/results/sm90-static.{json,md} must be what the script prints now."""
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "bench" / "results"
RULES = ("spills", "shared", "wgmma", "fences")


def _load_gate():
    spec = importlib.util.spec_from_file_location("check_triton_sm90", ROOT / "scripts" / "check_triton_sm90.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gate = _load_gate()


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """The gate's records and table, regenerated from the sources in a process without the interpreter."""
    for tool in ("ptxas", "cuobjdump"):
        if not (gate.TOOLS / tool).exists():
            pytest.skip(f"this triton wheel has no {tool}")
    out = tmp_path_factory.mktemp("sm90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_triton_sm90.py"), "--out-dir", str(out)],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert "kernel variants compiled for sm_90a" in result.stdout, (result.stdout + result.stderr)[-6000:]
    return json.loads((out / "sm90-static.json").read_text()), (out / "sm90-static.md").read_text()


def test_every_triton_kernel_is_in_the_gate(fresh):
    """A kernel added to r1kernels/triton/ without a case in the gate would go unchecked. Kernels (what
    the host launches) are named _r1k_<op>_<phase>, unique across the package, so that a profiler
    trace names each one."""
    records, _ = fresh
    compiled = {r["kernel"] for r in records}
    defined = set()
    for path in (ROOT / "r1kernels" / "triton").glob("*.py"):
        text = path.read_text()
        defined |= {f"{path.stem}.{name}" for name in re.findall(r"@triton\.jit\ndef (_r1k_\w+)\(", text)}
        launched = set(re.findall(r"\b(_\w+)\[\(", text))        # kernel[(grid,)](...) launches
        assert launched <= {name.split(".")[1] for name in defined}, f"{path.name}: launched but not _r1k_: {launched}"
    bare = [name.split(".")[1] for name in defined]
    assert len(bare) == len(set(bare)), "kernel names must be unique across the package"
    assert defined and defined == compiled


@pytest.mark.parametrize("rule", RULES)
def test_rule_holds_outside_known_failures(fresh, rule):
    records, _ = fresh
    unexpected = [f"{r['kernel']} [{r['config']}]" for r in records
                  if rule in gate.violations(r) and gate.known_failure(r, rule) is None]
    assert not unexpected, f"{rule} broken by:\n" + "\n".join(unexpected)
    stale = [key for key in gate.KNOWN_FAILURES if key[1] == rule
             and not any(rule in gate.violations(r) and gate.known_failure(r, rule) == key for r in records)]
    assert not stale, f"known failures that now pass (remove them from KNOWN_FAILURES): {stale}"


def test_committed_report_is_current(fresh):
    records, table = fresh
    committed = json.loads((COMMITTED / "sm90-static.json").read_text())
    if committed and committed[0]["triton"] != records[0]["triton"]:
        pytest.skip(f"committed with triton {committed[0]['triton']}, this is {records[0]['triton']}")
    assert committed == records, "stale: run `python scripts/check_triton_sm90.py` and commit bench/results/sm90-static.*"
    assert (COMMITTED / "sm90-static.md").read_text() == table


def test_fence_counter_sees_only_fences_inside_loops():
    sass = """
        /*0000*/                   MEMBAR.ALL.GPU ;
        /*0010*/                   IMAD.MOV.U32 R1, RZ, RZ, 0x1 ;
        /*0020*/                   MEMBAR.ALL.CTA ;
        /*0030*/                   MEMBAR.SC.GPU ;
        /*0040*/              @P0 MEMBAR.ALL.SYS ;
        /*0050*/              @!P1 BRA 0x10 ;
        /*0060*/                   MEMBAR.ALL.GPU ;
        /*0070*/                   BRA 0x70;
    """
    assert gate.fences_in_loops(sass) == 2        # 0x30 and 0x40 lie in the loop 0x10..0x50; 0x70 is the end trap


def test_occupancy_arithmetic():
    from bench.hardware import ctas_per_sm
    assert ctas_per_sm(255, 8, 1024) == 1                     # 255 regs x 256 threads fill the register file
    assert ctas_per_sm(32, 4, 0) == 16                        # then the 64-warp limit binds
    assert ctas_per_sm(64, 4, 100 * 1024) == 2                # two 100 KB blocks in 228 KB
