"""The documents, against the code and each other: the generated parts of docs/ops.md
(scripts/generate_docs.py) are current and the table they are made from is the one the code routes by;
the README stays a front door (at most 150 lines, its links and charts present); no page repeats
another."""
import importlib.util
import pathlib
import re

import pytest
import torch

import r1kernels
from r1kernels import grpo, logprobs

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("generate_docs", ROOT / "scripts" / "generate_docs.py")
generate_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate_docs)


def test_generated_parts_are_current():
    for path in generate_docs.FILES:
        text = path.read_text()
        assert generate_docs.render(text) == text, f"{path.name}: run python scripts/generate_docs.py"


def test_every_part_is_in_the_documents():
    text = "".join(path.read_text() for path in generate_docs.FILES)
    for name in generate_docs.PARTS:
        assert f"<!-- generated: {name} -->" in text, name
    with pytest.raises(KeyError, match="unknown generated part"):
        generate_docs.render("<!-- generated: nothing -->\n<!-- end generated -->")


def _reason(options, requires_grad=True):
    hidden = torch.randn(3, 4, requires_grad=requires_grad)
    return grpo._two_pass_reason(hidden, torch.randn(5, 4), None, grpo.LossOptions(**options))


def test_each_two_pass_route_is_what_the_code_takes(monkeypatch):
    """Every entry of TWO_PASS_ROUTES is a case the code sends to the two-pass route, and the code sends
    no case there that the table does not name."""
    seen = {
        _reason({}, requires_grad=False),
        _reason({"importance_sampling_level": "sequence"}),
        _reason({"off_policy_mask_threshold": 0.5}),
        _reason({"top_entropy_quantile": 0.5}),
        _reason({"loss_type": "vespo"}),
    }
    hidden = torch.randn(3, 4)
    seen |= {logprobs.one_pass_blocker(hidden, "triton_tile", False),
             logprobs.one_pass_blocker(hidden, "triton", True)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seen.add(logprobs.one_pass_blocker(hidden, "torch", False))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    seen.add(logprobs.one_pass_blocker(hidden, "torch", False))
    assert seen == set(grpo.TWO_PASS_ROUTES)
    monkeypatch.undo()
    assert _reason({"loss_type": "dapo", "beta": 0.1}) is None
    assert logprobs.one_pass_blocker(hidden, "torch", False) is None


def test_the_one_pass_route_runs_where_no_route_names_the_case():
    """linear_grpo_loss with none of the cases computes its gradients in the forward: loss.backward()
    then only scales what the forward stored (the tensor it returns carries them)."""
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    targets = torch.randint(0, 11, (6,))
    out = r1kernels.linear_grpo_loss(hidden, weight, targets, torch.randn(1), cu_seqlens=torch.tensor([0, 6]).int())
    assert type(out.loss.grad_fn).__name__.startswith("_LossWithGradients")
    with torch.no_grad():
        two_pass = r1kernels.linear_grpo_loss(hidden, weight, targets, torch.randn(1),
                                              cu_seqlens=torch.tensor([0, 6]).int())
    assert two_pass.loss.grad_fn is None


def test_loss_type_capabilities_agree_with_their_options():
    """The capability fields say what the option names used to: a clipped type takes delta, a type that
    needs max_completion_length or counts num_items_in_batch takes that option."""
    for name, entry in grpo.LOSS_TYPES.items():
        assert entry.clipped == ("delta" in entry.accepts), name
        assert entry.needs_max_completion_length == ("max_completion_length" in entry.accepts), name
        assert entry.counts_items == ("num_items_in_batch" in entry.accepts), name
    assert [n for n, e in grpo.LOSS_TYPES.items() if e.whole_sequence] == ["vespo"]


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_is_a_front_door():
    """At most 150 lines; every link and image it names exists (the charts python -m bench draws)."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150, len(text.splitlines())
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert any(t.endswith(".png") for t in targets), "the README shows a chart"
    for target in targets:
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def test_docs_links_exist():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_readme_example_runs():
    """The README's example of every op runs as printed and trains: the loss has gradients."""
    code = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert torch.isfinite(scope["out"].loss) and scope["hidden"].grad.abs().sum() > 0
    assert scope["adv"].shape == (16,) and scope["o"].shape == (10, 4, 64)


def test_no_page_repeats_another():
    """No sentence-long line of prose (60+ characters, not a table row or code) appears on two pages."""
    seen: dict = {}
    for page in PAGES:
        in_code = False
        for line in page.read_text().splitlines():
            in_code ^= line.startswith("```")
            text = line.strip()
            if in_code or len(text) < 60 or text.startswith(("|", "<!--")):
                continue
            assert seen.setdefault(text, page.name) == page.name, f"{page.name} repeats {seen[text]}: {text!r}"

