"""Security: no unpickling or unsafe YAML/eval in lorapipe; S3 credentials and the KFP token never
reach errors, logs, outputs, the compiled pipeline or the committed manifests and images."""

from __future__ import annotations

import ast
import io
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml

from lorapipe import redaction, store
from lorapipe.cli import main

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "lorapipe"

SECRET = "lorapipe-SeCrEt-wJalrXUtnFEMI-K7MDENG-bPxRfiCY"
ACCESS_KEY_ID = "AKIALORAPIPETESTONLY"
WRONG_SECRET = "WrOnG-sEcReT-9f8e7d6c5b4a-never-print-me"
KFP_TOKEN = "kfp-token-eyJhbGciOiJSUzI1NiJ9-do-not-print"
# shaped like STS's: base64 with '/', '+' and '=', so its URL-encoded form differs
SESSION_TOKEN = "FwoGZXIvYXdzEJr/lorapipe+SeSsIoN+token/never-print=="
DISTINCTIVE_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
    "AWS_SECRET_ACCESS_KEY": SECRET,
    "AWS_SESSION_TOKEN": SESSION_TOKEN,
    "KFP_TOKEN": KFP_TOKEN,
}
# what no output may hold: each value, and the token as a URL parameter spells it
CREDENTIALS = (*DISTINCTIVE_ENVIRONMENT.values(), quote(SESSION_TOKEN, safe=""))


# --------------------------------------------------------------------------- (a) the source


def _python_files() -> list[Path]:
    files = sorted(SOURCE.rglob("*.py"))
    assert len(files) > 20, "the lorapipe sources were not found"
    return files


def _call_name(node: ast.Call) -> str:
    """``torch.load`` / ``yaml.load`` / ``eval`` for a call, or ''."""
    func = node.func
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
        return ".".join(reversed(parts))
    return ""


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _keyword(node: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in node.keywords if k.arg == name), None)


UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve"}
UNSAFE_CALLS = {
    "eval",
    "exec",
    "compile",
    "yaml.unsafe_load",
    "yaml.full_load",
    "yaml.unsafe_load_all",
    "yaml.full_load_all",
    "numpy.load",  # allow_pickle is the risk; lorapipe has no reason to load .npy
    "np.load",
    "os.system",
    "joblib.load",
}
SAFE_LOADERS = {"SafeLoader", "CSafeLoader", "yaml.SafeLoader", "yaml.CSafeLoader"}


def unsafe_uses(path: Path) -> list[str]:
    """Every unpickling import, torch.load without weights_only=True, yaml.load without a safe
    Loader, eval/exec and shell=True in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    where = path.relative_to(ROOT)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNSAFE_MODULES:
                    found.append(f"{where}:{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in UNSAFE_MODULES:
                found.append(f"{where}:{node.lineno}: from {node.module} import ...")
            for alias in node.names:
                if node.module == "torch" and alias.name == "load":
                    found.append(f"{where}:{node.lineno}: from torch import load (unchecked)")
                if node.module == "yaml" and alias.name in ("load", "unsafe_load", "full_load"):
                    found.append(f"{where}:{node.lineno}: from yaml import {alias.name}")
        elif isinstance(node, ast.Call):
            name = _call_name(node)
            if name in UNSAFE_CALLS:
                found.append(f"{where}:{node.lineno}: {name}(...)")
            elif name == "torch.load" and not _is_true(_keyword(node, "weights_only")):
                found.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
            elif name in ("yaml.load", "yaml.load_all"):
                loader = _keyword(node, "Loader")
                if loader is None and len(node.args) > 1:
                    loader = node.args[1]
                if loader is None or ast.unparse(loader) not in SAFE_LOADERS:
                    found.append(f"{where}:{node.lineno}: {name} without SafeLoader")
            elif name.startswith("subprocess.") and _is_true(_keyword(node, "shell")):
                found.append(f"{where}:{node.lineno}: {name}(shell=True)")
    return found


def test_lorapipe_never_unpickles_evals_or_loads_yaml_unsafely() -> None:
    found = [use for path in _python_files() for use in unsafe_uses(path)]
    assert found == []


def test_the_only_torch_load_is_weights_only() -> None:
    """Optimizer state is the one thing lorapipe reads with torch.load, and only weights_only."""
    calls = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and _call_name(node) == "torch.load":
                calls.append((path.name, _is_true(_keyword(node, "weights_only"))))
    assert calls and all(weights_only for _, weights_only in calls), calls


def test_the_checker_catches_what_it_is_for(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle\nimport torch, yaml\nfrom cloudpickle import loads\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\n"
        "yaml.load(text)\nyaml.load(text, Loader=yaml.Loader)\nyaml.unsafe_load(text)\n"
        "eval('1')\nexec('x=1')\nsubprocess.run('ls', shell=True)\n"
        "torch.load('x', weights_only=True)\nyaml.load(text, Loader=yaml.SafeLoader)\n"
        "yaml.safe_load(text)\nmodel.eval()\n"
    )
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = unsafe_uses(bad)
    finally:
        ROOT = saved
    lines = sorted(int(use.split(":")[1]) for use in found)
    assert lines == [1, 3, 4, 5, 6, 7, 8, 9, 10, 11]


# --------------------------------------------------------------------------- (b) S3 secrets


class _RefusingS3(BaseHTTPRequestHandler):
    """An S3 endpoint that refuses every request's signature, as S3 and MinIO do for a wrong
    secret key (the body echoes the access key id and string to sign, never the secret)."""

    def _refuse(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = (
            '<?xml version="1.0" encoding="UTF-8"?><Error><Code>SignatureDoesNotMatch</Code>'
            "<Message>The request signature we calculated does not match the signature you "
            f"provided.</Message><AWSAccessKeyId>{ACCESS_KEY_ID}</AWSAccessKeyId>"
            "<RequestId>1</RequestId></Error>"
        ).encode()
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _refuse

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def refusing_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RefusingS3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(store, "_clients", {})
    monkeypatch.setenv("LORAPIPE_S3_ENDPOINT", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", WRONG_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    yield endpoint
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    "argv",
    [
        ["ingest", "s3://photos/raw", "--out", "s3://photos/ds", "--workers", "1"],
        ["augment", "s3://photos/ds", "--out", "s3://photos/aug"],
        ["select", "s3://photos/train-out", "--out", "s3://photos/lora"],
    ],
    ids=["ingest", "augment", "select"],
)
def test_a_wrong_secret_is_one_line_that_does_not_echo_it(
    refusing_s3: str,
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="lorapipe")
    code = main(argv)
    captured = capsys.readouterr()
    assert code != 0
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lorapipe {argv[0]}: error: "), captured
    assert "denied" in lines[0] and "credentials" in lines[0], lines[0]
    everything = captured.out + captured.err + caplog.text
    assert WRONG_SECRET not in everything
    assert ACCESS_KEY_ID not in everything


def test_a_wrong_secret_with_debug_shows_the_traceback_and_no_secret(
    refusing_s3: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    code = main(["--debug", "augment", "s3://photos/ds", "--out", "s3://photos/aug"])
    captured = capsys.readouterr()
    assert code == 2  # as without --debug
    assert "Traceback" in captured.err and "AccessDeniedError" in captured.err
    assert captured.err.splitlines()[-1].startswith("lorapipe augment: error: access to")
    # botocore logged the refusal's body, which echoes the key id: redacted
    assert "<AWSAccessKeyId>***</AWSAccessKeyId>" in caplog.text
    for value in (WRONG_SECRET, ACCESS_KEY_ID):
        assert value not in captured.out + captured.err + caplog.text


@pytest.fixture
def distinctive_credentials(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """moto's endpoint with credentials that are easy to grep for (moto accepts any, a session
    token too), and the KFP token beside them."""
    monkeypatch.setattr(store, "_clients", {})
    for variable, value in DISTINCTIVE_ENVIRONMENT.items():
        monkeypatch.setenv(variable, value)
    name = "secrets-" + SECRET[-6:].lower()
    store.client().create_bucket(Bucket=name)
    return f"s3://{name}"


def test_no_secret_in_any_output_object_or_log_of_a_run_on_s3(
    distinctive_credentials: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from lorapipe.demo.inputs import write_sample_folder

    bucket = distinctive_credentials
    caplog.set_level(logging.INFO)
    store.put_dir(write_sample_folder(tmp_path / "raw", count=9), f"{bucket}/raw")
    assert main(["ingest", f"{bucket}/raw", "--out", f"{bucket}/ds", "--workers", "1"]) == 0
    assert main(["augment", f"{bucket}/ds", "--out", f"{bucket}/aug"]) == 0
    captured = capsys.readouterr()

    objects = store.list_uris(f"{bucket}/")
    written = [uri for uri in objects if not uri.startswith(f"{bucket}/raw/")]
    assert any(uri.endswith("report.json") for uri in written)
    assert any(uri.endswith(".parquet") for uri in written)
    for uri in written:
        data = store.read_bytes(uri)
        for value in CREDENTIALS:
            assert value.encode() not in data, f"{value} in {uri}"
    for value in CREDENTIALS:
        assert value not in captured.out + captured.err + caplog.text


# --------------------------------------------------------------------------- (b2) --debug


def _lorapipe(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """``lorapipe --debug ARGV`` in a real process with this test's environment; its temporary
    files go under ``tmp_path``, where the grep sees whatever it leaves there."""
    temp = tmp_path / "tmp"
    temp.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "lorapipe.cli", "--debug", *argv],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TMPDIR": str(temp)},
    )


def _texts(name: str, data: bytes) -> list[bytes]:
    """A file's bytes and, for the formats that compress what they hold (Parquet pages, PNG
    text chunks), that content decoded, so that a grep cannot miss a credential inside."""
    texts = [data]
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        text_columns = [f.name for f in table.schema if not pa.types.is_binary(f.type)]
        texts.append(repr(table.select(text_columns).to_pylist()).encode())
    elif name.endswith(".png"):
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            texts.append(repr(image.info).encode())
    return texts


def _everything_written(bucket: str, local: Path) -> dict[str, bytes]:
    """Every object in the bucket and every file under ``local``, by name."""
    files = {uri: store.read_bytes(uri) for uri in store.list_uris(f"{bucket}/")}
    files |= {str(path): path.read_bytes() for path in local.rglob("*") if path.is_file()}
    return files


def _assert_no_credential_anywhere(printed: str, files: dict[str, bytes]) -> None:
    texts = {name: _texts(name, data) for name, data in files.items()}
    for number, value in enumerate(CREDENTIALS):
        assert value not in printed, f"credential {number} printed"
        found = [name for name, chunks in texts.items() if any(value.encode() in c for c in chunks)]
        assert found == [], f"credential {number} written"


def _assert_requests_were_logged_redacted(printed: str) -> None:
    """botocore's DEBUG request logging reached the output (so the grep was not vacuous), with
    each credential's place redacted."""
    assert "Credential=***/" in printed  # the Authorization header
    assert "'X-Amz-Security-Token': b'***'" in printed  # the header dict
    assert "x-amz-security-token:***" in printed  # the canonical request


def test_debug_output_of_stages_on_s3_shows_the_requests_but_no_credential(
    distinctive_credentials: str, tmp_path: Path
) -> None:
    from lorapipe.demo.inputs import write_sample_folder

    bucket = distinctive_credentials
    store.put_dir(write_sample_folder(tmp_path / "raw", count=4), f"{bucket}/raw")
    runs = [
        _lorapipe(tmp_path, "ingest", f"{bucket}/raw", "--out", f"{bucket}/ds", "--workers", "1"),
        _lorapipe(tmp_path, "augment", f"{bucket}/ds", "--out", f"{bucket}/aug"),
        _lorapipe(tmp_path, "select", f"{bucket}/nothing", "--out", f"{bucket}/lora"),
    ]
    printed = "".join(run.stdout + run.stderr for run in runs)
    assert [run.returncode for run in runs] == [0, 0, 2], printed[-3000:]
    assert "Traceback" in runs[2].stderr  # --debug: the failure's traceback, redacted too
    _assert_requests_were_logged_redacted(printed)
    _assert_no_credential_anywhere(printed, _everything_written(bucket, tmp_path))


@pytest.mark.slow  # six processes, four of them importing torch: ~3 minutes on 2 cores
def test_debug_output_of_the_whole_pipeline_on_s3_holds_no_credential(
    distinctive_credentials: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """ingest -> tag -> augment -> train (2 accelerate workers) -> select -> generate, every
    input and output on S3, every process with --debug."""
    pytest.importorskip("deepdanbooru")
    from lorapipe.demo.inputs import WORLD_TAGGER, write_sample_folder

    bucket = distinctive_credentials
    store.put_dir(write_sample_folder(tmp_path / "raw", count=6), f"{bucket}/raw")
    store.put_dir(WORLD_TAGGER, f"{bucket}/tagger")
    store.put_dir(tiny_model_dir, f"{bucket}/model")
    model, training, lora = f"{bucket}/model", f"{bucket}/training", f"{bucket}/lora"
    steps = [
        ["ingest", f"{bucket}/raw", "--out", f"{bucket}/ds", "--workers", "1"],
        ["tag", f"{bucket}/ds", "--out", f"{bucket}/tagged", "--project", f"{bucket}/tagger"],
        ["augment", f"{bucket}/tagged", "--out", f"{bucket}/aug"],
        ["train", "--train-data-dir", f"{bucket}/aug", "--base-model", model,
         "--output-dir", training, "--cache-dir", str(tmp_path / "cache"),
         "--resolution", "64", "--batch-size", "2", "--max-train-steps", "2",
         "--save-steps", "2", "--validation-split", "2", "--num-processes", "2"],
        ["select", training, "--out", lora],
        ["generate", "--base-model", model, "--trained-lora", lora, "--out", f"{bucket}/review",
         "--prompt", "filmstyle, a red circle", "--size", "64x64", "--seed", "1",
         "--steps", "1", "--lora-scales", "1", "--negative-presets", "none"],
    ]  # fmt: skip
    printed = ""
    for argv in steps:
        run = _lorapipe(tmp_path, *argv)
        printed += run.stdout + run.stderr
        assert run.returncode == 0, f"{argv[0]}: {run.stderr[-3000:]}"
    assert store.exists(f"{lora}/pytorch_lora_weights.safetensors")
    assert store.exists(f"{bucket}/review/report.html")
    _assert_requests_were_logged_redacted(printed)
    _assert_no_credential_anywhere(printed, _everything_written(bucket, tmp_path))


# --------------------------------------------------------------------------- (b3) redaction


@pytest.mark.parametrize(
    "line",
    [
        # botocore.endpoint's request log: a header dict with bytes values
        "headers={'X-Amz-Security-Token': b'IQoJb3JpZ2luX2VjEJr//role+token==', "
        "'Authorization': b'AWS4-HMAC-SHA256 Credential=ASIAROLEKEYID0000000/20250101/"
        "us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0123456789abcdef0123'}",
        # botocore.auth's canonical request and signature
        "host:s3.amazonaws.com\nx-amz-security-token:IQoJb3JpZ2luX2VjEJr//role+token==\n",
        "Signature:\n0123456789abcdef0123456789abcdef",
        # a presigned URL
        "https://b.s3.amazonaws.com/k?X-Amz-Credential=ASIAROLEKEYID0000000%2F20250101%2F"
        "us-east-1&X-Amz-Security-Token=IQoJb3JpZ2luX2VjEJr%2F%2Frole%2Btoken%3D%3D"
        "&X-Amz-Signature=0123456789abcdef0123",
        # an S3 error body, and a KFP request header
        "<Error><AWSAccessKeyId>ASIAROLEKEYID0000000</AWSAccessKeyId></Error>",
        "Authorization: Bearer IQoJb3JpZ2luX2VjEJr//role+token==",
    ],
    ids=["header-dict", "canonical-request", "signature", "presigned-url", "error-body", "bearer"],
)
def test_credentials_in_their_places_are_redacted_whoever_resolved_them(line: str) -> None:
    """A role's (IRSA, instance profile) credentials are in no variable: their places give
    them away."""
    scrubbed = redaction.Redactor([])(line)
    for value in ("ASIAROLEKEYID0000000", "IQoJb3JpZ2luX2VjEJr", "0123456789abcdef0123"):
        assert value not in scrubbed, scrubbed
    assert "***" in scrubbed


def test_credentials_of_the_aws_shared_files_are_redacted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = tmp_path / "credentials"
    credentials.write_text(
        "[default]\naws_access_key_id = AKIAFROMSHAREDFILE00\n"
        "aws_secret_access_key = shared-file-secret-0123456789\n"
    )
    config = tmp_path / "config"
    config.write_text("[profile other]\naws_session_token = shared-file-session-token\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    redact = redaction.Redactor(redaction.known_secrets())
    values = ["AKIAFROMSHAREDFILE00", "shared-file-secret-0123456789", "shared-file-session-token"]
    assert redact(" ".join(values)) == "*** *** ***"


def test_records_prints_and_tracebacks_are_scrubbed_whichever_way_they_leave(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    for name, value in DISTINCTIVE_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    caplog.set_level(logging.DEBUG)
    log = logging.getLogger("lorapipe.test_security")
    with redaction.redacted_output():
        log.debug("signing with %s", ACCESS_KEY_ID)
        try:
            raise RuntimeError(f"the server said {SECRET}")
        except RuntimeError:
            log.exception("request failed")
            traceback.print_exc()
        print(f"token {KFP_TOKEN}")
        sys.stderr.write(f"written in pieces {SESSION_TOKEN[:9]}")  # a line in two writes
        sys.stderr.write(f"{SESSION_TOKEN[9:]}\n")
    captured = capsys.readouterr()
    everything = captured.out + captured.err + caplog.text
    for number, value in enumerate(CREDENTIALS):
        assert value not in everything, f"credential {number}"
    assert "signing with ***" in caplog.text and "the server said ***" in caplog.text
    assert "RuntimeError: the server said ***" in captured.err
    assert captured.out == "token ***\n" and "written in pieces ***" in captured.err
    assert sys.stdout is not None and not isinstance(sys.stdout, redaction.RedactingStream)


def test_the_compiled_pipeline_holds_no_secret_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("kfp")
    from pipelines.lora_training import compile_pipeline

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("KFP_TOKEN", KFP_TOKEN)
    text = compile_pipeline(tmp_path / "pipeline.yaml").read_text()
    for value in (SECRET, ACCESS_KEY_ID, KFP_TOKEN):
        assert value not in text


# --------------------------------------------------------------------------- committed files

CREDENTIAL_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    "JWT": re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"),
    "AWS secret key": re.compile(
        r"(?i)secret[_-]?(access[_-]?)?key['\"]?\s*[:=]\s*['\"]?[A-Za-z0-9/+]{40}\b"
    ),
}
SECRET_NAME = re.compile(r"(?i)(password|secret|token|access_key|api_key|credential)")
ENV_SECRET_NAME = re.compile(r"(?i)(password|secret|token)")  # user names / key ids are not
PLACEHOLDER = re.compile(r"^CHANGE-ME")


def _committed_files() -> list[Path]:
    files = [ROOT / "pipelines" / "lora_training.yaml"]
    for folder in ("k8s", "images"):
        files += sorted(p for p in (ROOT / folder).rglob("*") if p.is_file())
    assert len(files) > 5
    return files


def test_no_committed_file_holds_a_credential() -> None:
    found = []
    for path in _committed_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for what, pattern in CREDENTIAL_PATTERNS.items():
            for match in pattern.finditer(text):
                found.append(f"{path.relative_to(ROOT)}: {what}: {match.group(0)[:12]}...")
    assert found == []


def test_the_kustomize_env_files_hold_only_placeholders() -> None:
    env_files = sorted((ROOT / "k8s").rglob("*.env"))
    assert {p.name for p in env_files} >= {"minio.env", "s3.env"}
    secrets = 0
    for path in env_files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            name, _, value = line.partition("=")
            if ENV_SECRET_NAME.search(name):
                secrets += 1
                assert PLACEHOLDER.match(value.strip()), f"{path.name}:{number}: {name} is set"
    assert secrets >= 2


def _env_literals(node: object, where: str) -> Iterator[str]:
    """Every env entry ``{name: <SECRET-ish>, value: <literal>}`` in parsed YAML."""
    if isinstance(node, dict):
        name = node.get("name") or node.get("envVar")
        if isinstance(name, str) and SECRET_NAME.search(name) and "value" in node:
            value = node["value"]
            if isinstance(value, str) and value and not value.startswith(("$(", "${")):
                yield f"{where}: {name} has a literal value"
        for value in node.values():
            yield from _env_literals(value, where)
    elif isinstance(node, list):
        for item in node:
            yield from _env_literals(item, where)


def test_manifests_and_pipeline_take_credentials_from_secrets_not_literals() -> None:
    found = []
    for path in _committed_files():
        if path.suffix not in (".yaml", ".yml"):
            continue
        for document in yaml.safe_load_all(path.read_text()):
            found += _env_literals(document, str(path.relative_to(ROOT)))
            if isinstance(document, dict) and document.get("kind") == "Kustomization":
                for generator in document.get("secretGenerator", []):
                    literals = generator.get("literals", [])
                    found += [f"{path.name}: secretGenerator literal {x}" for x in literals]
    assert found == []


def test_dockerfiles_bake_in_no_credentials() -> None:
    found = []
    for path in sorted((ROOT / "images").glob("*Dockerfile*")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            words = line.split()
            if len(words) > 1 and words[0].upper() in ("ENV", "ARG"):
                assignment = " ".join(words[1:])
                if SECRET_NAME.search(assignment.split("=")[0]) and "=" in assignment:
                    found.append(f"{path.name}:{number}: {line.strip()}")
    assert found == []


# --------------------------------------------------------------------------- (c) KFP token


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def kfp_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    pytest.importorskip("kfp")
    import pipelines.cluster

    package = tmp_path / "pipeline.yaml"
    package.write_text("{}\n")
    # never rewrite the committed pipelines/lora_training.yaml from a test
    monkeypatch.setattr(pipelines.cluster, "compile_pipeline", lambda: package)
    monkeypatch.setenv("KFP_TOKEN", KFP_TOKEN)
    monkeypatch.delenv("KFP_HOST", raising=False)
    return package


def _run_pipelines(argv: list[str]) -> tuple[int | None, str]:
    """(exit code or None when it raised, the formatted traceback if any)."""
    from pipelines.__main__ import main as pipelines_main

    try:
        return pipelines_main(argv), ""
    except Exception as error:  # today a kfp/urllib3 error escapes as a traceback
        return None, "".join(traceback.format_exception(error))


class _RecordingClient:
    """Stands in for kfp.Client: records how it was built and refuses like a server's 401."""

    built: list[dict] = []

    def __init__(self, **kwargs: object) -> None:
        _RecordingClient.built.append(kwargs)

    def get_pipeline_id(self, name: str) -> None:
        raise RuntimeError("(401) Reason: Unauthorized HTTP response body: token rejected")


@pytest.mark.parametrize("command", [["submit"], ["schedule", "--cron", "0 0 3 * * 1"]])
def test_the_kfp_token_is_sent_but_never_printed_on_error(
    kfp_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    command: list[str],
) -> None:
    import kfp

    _RecordingClient.built.clear()
    monkeypatch.setattr(kfp, "Client", _RecordingClient)
    caplog.set_level(logging.DEBUG)
    code, shown = _run_pipelines([*command, "--host", "https://kfp.example.invalid/pipeline"])
    assert code != 0
    assert _RecordingClient.built[0]["existing_token"] == KFP_TOKEN
    captured = capsys.readouterr()
    assert KFP_TOKEN not in shown + captured.out + captured.err + caplog.text


def test_the_kfp_token_is_not_printed_when_the_host_refuses_connections(
    kfp_env: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    code, shown = _run_pipelines(["submit", "--host", f"http://127.0.0.1:{_closed_port()}"])
    assert code != 0
    captured = capsys.readouterr()
    assert KFP_TOKEN not in shown + captured.out + captured.err + caplog.text
