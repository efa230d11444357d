"""Pipelines (`weightsmith run`), model cards along a chain, and `push` against a local stand-in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from weightsmith.checkpoint.card import _front_matter


def _recipe(tmp_path: Path, src: Path, bits: int = 4) -> Path:
    r = tmp_path / "pipe.yaml"
    r.write_text(
        yaml.safe_dump(
            {
                "source": str(src),
                "out": "out",
                "steps": [
                    {"name": "base", "pass": "import"},
                    {"name": "w8", "pass": "quant", "options": {"method": "rtn", "bits": 8, "group_size": 32}},
                    {
                        "name": "w4",
                        "pass": "quant",
                        "input": "base",
                        "options": {"method": "rtn", "bits": bits, "group_size": 32},
                    },
                ],
            }
        )
    )
    return r


def test_run_recipe_is_incremental(tiny_model, cli, tmp_path):
    src = tiny_model("llama")
    recipe = _recipe(tmp_path, src)
    r = cli("run", recipe, "--json")
    assert r.code == 0, r
    assert [s["status"] for s in json.loads(r.out)] == ["written"] * 3
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*/manifest.json")}
    r = cli("run", recipe, "--json")
    assert r.code == 0, r
    assert [s["status"] for s in json.loads(r.out)] == ["up-to-date"] * 3
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*/manifest.json")}
    # changing one step's options reruns that step only (its siblings and ancestors are fresh)
    _recipe(tmp_path, src, bits=3)
    r = cli("run", recipe, "--json")
    assert r.code == 0, r
    assert [s["status"] for s in json.loads(r.out)] == ["up-to-date", "up-to-date", "written"]
    m = json.loads((tmp_path / "out" / "w4" / "manifest.json").read_text())
    assert [s["pass"]["name"] for s in m["chain"]] == ["import"] and m["pass"]["name"] == "quant"
    card = (tmp_path / "out" / "w4" / "README.md").read_text()
    fm = _front_matter(card)
    assert fm["library_name"] == "transformers" and "weightsmith" in fm["tags"] and "import" in card and "quant" in card


def test_run_recipe_dry_run_and_errors(tiny_model, cli, tmp_path):
    src = tiny_model("llama")
    r = cli("run", _recipe(tmp_path, src), "--dry-run", "--json")
    assert r.code == 0, r
    rows = json.loads(r.out)
    assert (
        rows[0]["status"] == "dry-run" and rows[1]["status"].startswith("pending") and not (tmp_path / "out").exists()
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"source": str(src), "steps": [{"name": "x", "pass": "quant", "options": {"bitz": 4}}]})
    )
    r = cli("run", bad)
    assert r.code == 2 and "step 'x'" in r.err and "bitz" in r.err
    bad.write_text(yaml.safe_dump({"source": str(src), "steps": [{"name": "x", "pass": "nope"}]}))
    r = cli("run", bad)
    assert r.code == 2 and "unknown pass 'nope'" in r.err
    bad.write_text(yaml.safe_dump({"source": str(src), "steps": [{"name": "../x", "pass": "import"}]}))
    assert "plain file name" in cli("run", bad).err


def test_run_checks_every_step_before_the_first_starts(tiny_model, cli, tmp_path):
    """A bad choice or a missing input in a later step is refused before any pass writes anything,
    with the same message the command line gives for the same value (one build_config)."""
    src = tiny_model("llama")
    bad = tmp_path / "late.yaml"
    steps = [{"name": "base", "pass": "import"}, {"name": "q", "pass": "quant", "options": {"method": "rtnx"}}]
    bad.write_text(yaml.safe_dump({"source": str(src), "out": "out", "steps": steps}))
    r = cli("run", bad)
    assert r.code == 2 and "step 'q'" in r.err and "'rtnx' is not one of" in r.err, r
    assert not (tmp_path / "out").exists()  # the import step never ran
    (tmp_path / "opts.yaml").write_text("method: rtnx\n")
    direct = cli("quant", src, tmp_path / "direct", "--recipe", tmp_path / "opts.yaml")
    assert direct.code == 2 and r.err.split("'q': ")[1] == direct.err.split("Error: ")[1], (r.err, direct.err)
    steps = [
        {"name": "base", "pass": "import"},
        {"name": "q", "pass": "quant", "input": str(tmp_path / "nowhere"), "options": {"method": "rtn"}},
    ]
    bad.write_text(yaml.safe_dump({"source": str(src), "out": "out", "steps": steps}))
    r = cli("run", bad)
    assert r.code == 2 and "step 'q'" in r.err and "nowhere does not exist" in r.err, r
    assert not (tmp_path / "out").exists()


def test_build_config_is_the_one_way_to_make_a_config():
    from weightsmith.app.cli_options import build_config
    from weightsmith.app.registry import get_pass
    from weightsmith.errors import UsageError

    spec = get_pass("quant")
    cfg = build_config(
        spec, {"method": "rtn", "bits": "3", "override": ["x:skip"]}
    )  # recipe strings and lists become field types
    assert (cfg.method, cfg.bits, cfg.override) == ("rtn", 3, ("x:skip",))
    for values, msg in (
        ({"method": "rtnx"}, "is not one of"),
        ({"bitz": 4}, "unknown option(s) bitz"),
        ({"block_size": "big"}, "not a valid int"),
    ):
        with pytest.raises(UsageError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            build_config(spec, values)


class StandIn:
    """A local stand-in for huggingface_hub.HfApi: records what it was asked to do."""

    def __init__(self):
        self.calls = []
        self.token = "hf_fake"

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw["repo_id"], kw))

        class Info:
            commit_url = f"https://hub.local/{kw['repo_id']}/commit/1"
            pr_url = None

        return Info()


def test_push_dry_run_lists_verified_files_and_uploads_offline(tiny_model, cli, tmp_path, monkeypatch):
    from weightsmith.app import publish

    out = tmp_path / "q"
    assert cli("quant", tiny_model("llama"), out, "--method", "rtn", "--max-shard-size", "100KB").code == 0
    r = cli("push", "me/tiny-w4", out, "--dry-run", "--json")
    assert r.code == 0, r
    plan = json.loads(r.out)
    listed = set(json.loads((out / "manifest.json").read_text())["outputs"]["files"]) | {"manifest.json"}
    assert set(plan["files"]) == listed and len([f for f in listed if f.endswith(".safetensors")]) > 1
    stand_in = StandIn()
    made = {}
    monkeypatch.setattr(publish, "make_api", lambda endpoint=None, token=None: made.update(token=token) or stand_in)
    r = cli(
        "push",
        "me/tiny-w4",
        out,
        "--private",
        "--revision",
        "v2",
        "--token",
        "hf_given",
        "--commit-message",
        "first",
        "--json",
    )
    assert r.code == 0, r
    kinds = [c[0] for c in stand_in.calls]
    assert kinds == ["create_repo", "create_branch", "upload_folder"]
    up = stand_in.calls[-1][2]
    assert sorted(up["allow_patterns"]) == sorted(listed)
    assert "*.safetensors" in up["delete_patterns"] and up["revision"] == "v2"
    assert stand_in.calls[0][2]["private"] is True and up["commit_message"] == "first" and made["token"] == "hf_given"
    assert "hf_fake" not in r.out + r.err and "hf_given" not in r.out + r.err
    (out / "notes.txt").write_text("not part of the output")  # a stray file: verify fails, nothing is uploaded
    r = cli("push", "me/tiny-w4", out)
    assert r.code == 1 and "notes.txt" in r.err and len(stand_in.calls) == 3


def test_push_old_order_filters_and_usage(tiny_model, cli, tmp_path):
    out = tmp_path / "q"
    assert cli("quant", tiny_model("llama"), out, "--method", "rtn", "--max-shard-size", "100KB").code == 0
    r = cli("push", out, "me/tiny-w4", "--dry-run", "--json")  # the order before 0.2 still works, with a note
    assert r.code == 0 and "deprecated" in r.err and json.loads(r.out)["repo_id"] == "me/tiny-w4"
    plan = json.loads(cli("push", "me/tiny-w4", out, "--dry-run", "--json", "--exclude", "*.safetensors").out)
    assert not any(f.endswith(".safetensors") for f in plan["files"]) and "manifest.json" in plan["files"]
    assert plan["delete_patterns"] == []  # a partial upload never deletes the remote's weights
    plan = json.loads(cli("push", "me/tiny-w4", out, "--dry-run", "--json", "--include", "README.md").out)
    assert sorted(plan["files"]) == ["README.md", "manifest.json"]
    assert cli("push", "me/tiny-w4").code == 2  # missing PATH: a usage error
    r = cli("quant", tiny_model("llama"), "--method", "rtn")  # missing DST: a usage error too
    assert r.code == 2 and "give an output directory DST" in r.err
    from weightsmith.app.cli import _add_pass_commands
    from weightsmith.app.cli import cli as group

    _add_pass_commands()
    for name, cmd in group.commands.items():  # command list lines end at a word
        short = cmd.get_short_help_str(limit=60)
        assert short.endswith("...") or short == (cmd.help or "").split("\n")[0].strip().rstrip("."), (name, short)


def test_push_refuses_unverified_output(tiny_model, cli, tmp_path):
    out = tmp_path / "q"
    assert cli("import", tiny_model("llama"), out).code == 0
    shard = next(out.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    r = cli("push", "me/x", out, "--dry-run")
    assert r.code != 0 and "verify" in r.err and shard.name in r.err
    assert "not a Hub repo id" in cli("push", "no-slash", out, "--dry-run").err


def test_example_makefile_reruns_only_what_changed(tiny_model, tmp_path):
    """examples/Makefile on a tiny model with fast step options: a second make is a no-op; editing
    one step's options reruns that step and the ones after it only."""
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    steps = tmp_path / "steps"
    steps.mkdir()
    (steps / "pruned.yaml").write_text(
        "params: '0.8'\ncalib: demo:hamlet\ncalib_samples: 8\ncalib_length: 64\ncandidates: 2\nscore_windows: 2\n"
    )
    (steps / "distilled.yaml").write_text("calib: demo:hamlet\ntokens: 512\ncalib_length: 64\nbatch_size: 2\n")
    (steps / "mla.yaml").write_text(
        "method: transmla\nkv_ratio: 0.5\ncalib: demo:hamlet\ncalib_samples: 4\ncalib_length: 64\n"
    )
    (steps / "w4.yaml").write_text(
        "method: gptq\nbits: 4\ngroup_size: 32\ncalib: demo:hamlet\ncalib_samples: 4\ncalib_length: 64\n"
        "override: ['\\.kv_(a_proj_with_mqa|b_proj)$:skip']\n"
    )
    ws = f"{sys.executable} -m weightsmith"  # the tree under test, whatever console script is installed
    args = [
        "make",
        "-C",
        str(root / "examples"),
        f"WS={ws}",
        f"SRC={tiny_model('llama', layers=5)}",
        f"OUT={tmp_path / 'out'}",
        f"STEPS={steps}",
    ]
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    first = subprocess.run(args, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    m = json.loads((tmp_path / "out" / "w4" / "manifest.json").read_text())
    assert [s["pass"]["name"] for s in m["chain"]] == ["import", "minitron", "mla", "distill"] and m["pass"][
        "name"
    ] == "quant"
    card = (tmp_path / "out" / "w4" / "README.md").read_text()
    assert all(p in card for p in ("minitron", "mla", "distill", "quant"))
    import torch

    import weightsmith

    final = weightsmith.load(
        tmp_path / "out" / "w4"
    )  # MLA layout + GPTQ weights (stock GPTQ loading needs optimum, not installed)
    assert type(final).__name__ == "DeepseekV3ForCausalLM"
    assert final.generate(torch.tensor([[5, 17, 42]]), max_new_tokens=3, do_sample=False).shape == (1, 6)
    second = subprocess.run(args, capture_output=True, text=True)
    assert second.returncode == 0 and "weightsmith" not in second.stdout and "Nothing to be done" in second.stdout
    stamps = {p.parent.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*/manifest.json")}
    (steps / "distilled.yaml").write_text("calib: demo:hamlet\ntokens: 768\ncalib_length: 64\nbatch_size: 2\n")
    third = subprocess.run(args, capture_output=True, text=True)
    assert third.returncode == 0, third.stderr[-2000:]
    ran = [line[len(ws) :].split()[0] for line in third.stdout.splitlines() if line.startswith(ws)]
    assert ran == ["distill", "quant"], third.stdout
    after = {p.parent.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*/manifest.json")}
    assert after["base"] == stamps["base"] and after["pruned"] == stamps["pruned"] and after["mla"] == stamps["mla"]


def test_example_recipe_parses_and_plans(cli, tmp_path):
    import shutil

    root = Path(__file__).resolve().parents[1]
    recipe = shutil.copy(root / "examples" / "pipeline.yaml", tmp_path)  # outputs resolve next to it: none yet
    r = cli("run", recipe, "--dry-run", "--json")
    assert r.code == 0, r
    rows = json.loads(r.out)
    assert [x["pass"] for x in rows] == ["import", "minitron", "mla", "distill", "quant"]
    assert rows[0]["status"] == "dry-run" and all(x["status"].startswith("pending") for x in rows[1:])
    assert rows[3]["inputs"][0].endswith("out/mla") and rows[3]["inputs"][1].endswith("out/base")  # student, teacher
