"""The Hopper static gate (scripts/check_triton_sm90.py): every Triton kernel configuration the
dispatch launches, compiled for sm_90a down to SASS with no GPU, must not spill, must fit in shared
memory, must run its bf16/fp16 products on wgmma only (no mma.sync), none narrower than N = 64 (or
the head dim), with at least 2 stages of asynchronous loads, and must keep GPU-scope fences out of its
loops. The installed Triton's report, bench/results/sm90-static-triton<version>.{json,md}, must be
what the script prints now; the report of the lowest Triton the extras admit (the GPU machine's) must be
committed too, made from today's inputs, and obey the same rules."""
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "bench" / "results"
RULES = ("spills", "shared", "wgmma", "wgmma_n", "pipelined", "fences")


def _load_gate():
    spec = importlib.util.spec_from_file_location("check_triton_sm90", ROOT / "scripts" / "check_triton_sm90.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gate = _load_gate()


def lowest_admitted_triton() -> str:
    """The lower bound of the ``triton`` extra (pyproject.toml), as a full version."""
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["triton"]
    low = re.search(r">=\s*([\d.]+)", extra[0]).group(1)
    return ".".join((low.split(".") + ["0", "0"])[:3])


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """The gate's report and table, regenerated from the sources in a process without the interpreter."""
    for tool in ("ptxas", "cuobjdump"):
        if not (gate.TOOLS / tool).exists():
            pytest.skip(f"this triton wheel has no {tool}")
    out = tmp_path_factory.mktemp("sm90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_triton_sm90.py"), "--out-dir", str(out)],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert "kernel variants compiled for sm_90a" in result.stdout, (result.stdout + result.stderr)[-6000:]
    name = gate.report_name(gate.triton.__version__)
    return json.loads((out / f"{name}.json").read_text()), (out / f"{name}.md").read_text()


def _committed() -> dict:
    """Every committed report, by Triton version."""
    reports = {}
    for path in sorted(COMMITTED.glob("sm90-static-triton*.json")):
        report = json.loads(path.read_text())
        reports[report["triton"]] = report
    return reports


def test_every_triton_kernel_is_in_the_gate(fresh):
    """A Triton kernel added to the package without a case in the gate would go unchecked. Kernels (what
    the host launches) are named _r1k_<op>_<phase>, unique across the package, so that a profiler
    trace names each one."""
    records = fresh[0]["records"]
    compiled = {r["kernel"] for r in records}
    defined = set()
    for path in gate.triton_sources():
        text = path.read_text()
        module = ".".join(path.relative_to(ROOT / "r1kernels").with_suffix("").parts)
        defined |= {f"{module}.{name}" for name in re.findall(r"@triton\.jit\ndef (_r1k_\w+)\(", text)}
        launched = set(re.findall(r"\b(_\w+)\[\(", text))        # kernel[(grid,)](...) launches
        assert launched <= {name.rsplit(".", 1)[1] for name in defined}, \
            f"{path.name}: launched but not _r1k_: {launched}"
    bare = [name.rsplit(".", 1)[1] for name in defined]
    assert len(bare) == len(set(bare)), "kernel names must be unique across the package"
    assert defined and defined == compiled


def _check_rule(records: list, rule: str, version: str) -> None:
    unexpected = [f"{r['kernel']} [{r['config']}]" for r in records
                  if rule in gate.violations(r) and gate.known_failure(r, rule) is None]
    assert not unexpected, f"triton {version}: {rule} broken by:\n" + "\n".join(unexpected)


@pytest.mark.parametrize("rule", RULES)
def test_rule_holds_outside_known_failures(fresh, rule):
    records = fresh[0]["records"]
    _check_rule(records, rule, fresh[0]["triton"])
    reports = {**_committed(), fresh[0]["triton"]: fresh[0]}
    # an entry no configuration of any committed compiler breaks is stale (entries may name one compiler)
    stale = [key for key in gate.KNOWN_FAILURES if key[1] == rule
             and not any(rule in gate.violations(r) and gate.known_failure(r, rule) == key
                         for report in reports.values() for r in report["records"])]
    assert not stale, f"known failures that now pass (remove them from KNOWN_FAILURES): {stale}"


def test_committed_report_is_current(fresh):
    report, table = fresh
    name = gate.report_name(report["triton"])
    committed = _committed().get(report["triton"])
    assert committed is not None, f"no report for triton {report['triton']}: run the gate and commit {name}.*"
    assert committed == report, f"stale: run `python scripts/check_triton_sm90.py` and commit bench/results/{name}.*"
    assert (COMMITTED / f"{name}.md").read_text() == table


@pytest.mark.parametrize("rule", RULES)
def test_the_other_compilers_reports_are_current_and_obey_the_rules(rule):
    """Each committed report of a Triton other than the installed one (the GPU machine's 3.6.0, or the
    newest) was made from today's kernel sources, gate and shapes, and obeys every rule outside the
    documented exceptions. The lowest Triton the extras admit has one."""
    reports = _committed()
    assert lowest_admitted_triton() in reports, "commit the lowest admitted Triton's report: " \
        "bash scripts/check_triton_sm90_all.sh"
    for version, report in reports.items():
        assert report["inputs_sha256"] == gate.inputs_sha256(), (
            f"bench/results/{gate.report_name(version)}.json was made from other kernel sources, gate or "
            "shapes: regenerate it (bash scripts/check_triton_sm90_all.sh)")
        _check_rule(report["records"], rule, version)


def test_mma_counter_tells_wgmma_from_mma_sync():
    sass = """
        /*0100*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0110*/                   HGMMA.64x16x16.F32.BF16 R88, gdesc[UR8], R88, gsb0 ;
        /*0120*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], R24 ;
        /*0130*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0140*/                   LDGSTS.E.BYPASS.LTC128B.128 [R3], desc[UR6][R4.64] ;
        /*0150*/                   UTMALDG.2D [UR8], [UR4] ;
    """
    assert gate.mma_counts(sass) == dict(hmma=1, hgmma=3, hgmma_shapes=["64x16x16", "64x64x16"], hgmma_min_n=16,
                                         async_copies=2)
    record = dict(spill_bytes=0, shared_bytes=0, has_dot_lowp=True, hmma=1, hgmma=3, hgmma_min_n=16,
                  hgmma_n_floor=16, stages=2, async_copies=2, fences_in_loop=0)
    assert gate.violations(record) == ["wgmma"]                 # any mma.sync in a bf16/fp16 kernel breaks it
    assert gate.violations({**record, "hmma": 0}) == []         # N = 16 where the head dim is 16
    assert gate.violations({**record, "hmma": 0, "hgmma_n_floor": 64}) == ["wgmma_n"]
    assert gate.violations({**record, "hmma": 0, "stages": 1}) == ["pipelined"]
    assert gate.violations({**record, "hmma": 0, "async_copies": 0}) == ["pipelined"]
    assert gate.violations({**record, "has_dot_lowp": False, "stages": 1}) == []     # fp32 row kernels


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
