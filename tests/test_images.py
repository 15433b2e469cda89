"""The Dockerfiles in images/, checked offline: they parse, copy only what exists (and what
.dockerignore lets into the build context), run as a non-root user with `lorapipe` as the
entrypoint, and `make images` tags exactly the images that components/images.py names."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
DOCKERFILES = {name: IMAGES / f"{name}.Dockerfile" for name in ("base", "tagger", "torch")}
# what components/images.py names, by Dockerfile
IMAGE_CONSTANTS = {"base": "BASE_IMAGE", "tagger": "TAGGER_IMAGE", "torch": "TORCH_IMAGE"}

KEYWORDS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}  # fmt: skip


# --------------------------------------------------------------------------- a small parser


@dataclass
class Instruction:
    keyword: str
    value: str
    line: int


@dataclass
class Dockerfile:
    path: Path
    instructions: list[Instruction]
    args: dict[str, str] = field(default_factory=dict)  # ARG defaults, global and stage

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def expand(self, text: str, extra: dict[str, str] | None = None) -> str:
        """${VAR}, $VAR and ${VAR:-default} with the ARG defaults (and ENV values)."""
        values = {**self.args, **(extra or {})}

        def replace(match: re.Match[str]) -> str:
            name = match.group("braced") or match.group("bare")
            default = match.group("default")
            value = values.get(name, "")
            return value if value or default is None else default

        pattern = r"\$(?:\{(?P<braced>\w+)(?::-(?P<default>[^}]*))?\}|(?P<bare>\w+))"
        for _ in range(5):  # ARG defaults may refer to earlier ARGs
            text = re.sub(pattern, replace, text)
        return text


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions with line continuations joined and comments dropped; raises ValueError
    on an unknown keyword, a dangling continuation, or anything but ARG before the first FROM."""
    escape = "\\"
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    lines = path.read_text().splitlines()
    for number, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            directive = re.match(r"#\s*escape\s*=\s*(\S)", stripped)
            if directive and not instructions:
                escape = directive.group(1)
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped
        if not pending:
            start = number
        if stripped.endswith(escape):
            pending.append(stripped[:-1])
            continue
        pending.append(stripped)
        text = " ".join(part.strip() for part in pending if part.strip())
        pending = []
        keyword, _, value = text.partition(" ")
        if keyword.upper() not in KEYWORDS:
            raise ValueError(f"{path.name} line {start}: unknown instruction {keyword!r}")
        if not value.strip():
            raise ValueError(f"{path.name} line {start}: {keyword} has no arguments")
        instructions.append(Instruction(keyword.upper(), value.strip(), start))
    if pending:
        raise ValueError(f"{path.name}: the last instruction ends in a line continuation")
    froms = [n for n, i in enumerate(instructions) if i.keyword == "FROM"]
    if not froms:
        raise ValueError(f"{path.name}: no FROM")
    if any(i.keyword != "ARG" for i in instructions[: froms[0]]):
        raise ValueError(f"{path.name}: only ARG may come before the first FROM")
    dockerfile = Dockerfile(path, instructions)
    for instruction in dockerfile.all("ARG"):
        name, _, default = instruction.value.partition("=")
        if default or name.strip() not in dockerfile.args:
            dockerfile.args[name.strip()] = dockerfile.expand(default.strip().strip('"'))
    return dockerfile


def exec_form(value: str) -> list[str] | None:
    """The JSON array of CMD/ENTRYPOINT/RUN, or None for the shell form."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, list) and all(isinstance(p, str) for p in parsed) else None


def env_values(dockerfile: Dockerfile) -> dict[str, str]:
    values: dict[str, str] = {}
    for instruction in dockerfile.all("ENV"):
        for item in shlex.split(instruction.value):
            name, sep, value = item.partition("=")
            assert sep, f"{dockerfile.path.name} line {instruction.line}: use ENV NAME=value"
            values[name] = dockerfile.expand(value, values)
    return values


def copy_sources(dockerfile: Dockerfile, instruction: Instruction) -> list[str]:
    """The sources of a COPY/ADD from the build context ([] for COPY --from=stage)."""
    parts = exec_form(instruction.value) or shlex.split(instruction.value)
    flags = [p for p in parts if p.startswith("--")]
    if any(flag.startswith("--from=") for flag in flags):
        return []
    operands = [dockerfile.expand(p) for p in parts if not p.startswith("--")]
    assert len(operands) >= 2, f"{instruction.keyword} needs a source and a destination"
    return operands[:-1]


# --------------------------------------------------------------------------- .dockerignore


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        glob = line.lstrip("!").strip().strip("/")
        regex = ""
        index = 0
        while index < len(glob):
            if glob.startswith("**/", index):
                regex, index = regex + "(?:.*/)?", index + 3
            elif glob.startswith("**", index):
                regex, index = regex + ".*", index + 2
            elif glob[index] == "*":
                regex, index = regex + "[^/]*", index + 1
            elif glob[index] == "?":
                regex, index = regex + "[^/]", index + 1
            elif glob[index] == "[":
                end = glob.index("]", index)
                regex, index = regex + glob[index : end + 1], end + 1
            else:
                regex, index = regex + re.escape(glob[index]), index + 1
        patterns.append((negate, re.compile(regex + r"\Z")))
    return patterns


def in_build_context(relative: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent directory
    matches everything under it."""
    parts = relative.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negate, pattern in dockerignore_patterns():
        if any(pattern.match(candidate) for candidate in candidates):
            excluded = not negate
    return not excluded


# --------------------------------------------------------------------------- the Dockerfiles


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def dockerfile(request: pytest.FixtureRequest) -> Dockerfile:
    return parse_dockerfile(DOCKERFILES[request.param])


def test_parser_rejects_broken_dockerfiles(tmp_path: Path) -> None:
    cases = {
        "RUN echo hi\nFROM python:3.11-slim\n": "before the first FROM",
        "FROM python:3.11-slim\nRUNN echo hi\n": "unknown instruction",
        "FROM python:3.11-slim\nRUN echo \\\n": "line continuation",
        "ARG X=1\n": "no FROM",
    }
    for text, message in cases.items():
        path = tmp_path / "Dockerfile"
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            parse_dockerfile(path)


def test_dockerfile_parses_with_pinned_base(dockerfile: Dockerfile) -> None:
    (base,) = dockerfile.all("FROM")  # one stage
    image = dockerfile.expand(base.value.split()[0])
    name, _, tag = image.rpartition(":")
    assert "$" not in image and "@" not in image, image
    assert name.endswith("python") and re.fullmatch(r"3\.11\.\d+-slim-\w+", tag), image


def test_copy_sources_exist_and_are_in_the_build_context(dockerfile: Dockerfile) -> None:
    copies = dockerfile.all("COPY") + dockerfile.all("ADD")
    assert copies
    for instruction in copies:
        for source in copy_sources(dockerfile, instruction):
            assert not source.startswith(("/", "..")), f"{source}: outside the build context"
            matches = list(ROOT.glob(source.rstrip("/"))) if source not in (".", "./") else [ROOT]
            assert matches, f"{dockerfile.path.name} line {instruction.line}: {source} not found"
            for match in matches:
                files = [match] if match.is_file() else sorted(match.rglob("*.py"))
                for file in files:
                    relative = file.relative_to(ROOT).as_posix()
                    if "__pycache__" in relative or ".egg-info" in relative:
                        continue
                    assert in_build_context(relative), f"{relative} is in .dockerignore"


def test_dockerignore_keeps_the_context_small() -> None:
    for path in (".venv/bin/python", ".git/HEAD", "runs/x.png", "tests/test_images.py"):
        assert not in_build_context(path), path
    for path in ("pyproject.toml", "README.md", "src/lorapipe/cli.py"):
        assert in_build_context(path), path
    assert not in_build_context("src/lorapipe/__pycache__/cli.cpython-311.pyc")


def test_runs_as_non_root_with_a_writable_home(dockerfile: Dockerfile) -> None:
    users = dockerfile.all("USER")
    assert users, "no USER: the image would run as root"
    user, _, group = dockerfile.expand(users[-1].value).partition(":")
    # numeric, so that Kubernetes' runAsNonRoot can verify it
    assert user.isdigit() and int(user) != 0, user
    assert not group or (group.isdigit() and int(group) != 0), group
    assert users[-1].line > max(i.line for i in dockerfile.all("RUN")), "RUN after USER"
    env = env_values(dockerfile)
    assert env.get("PYTHONUNBUFFERED") == "1" and env.get("PIP_NO_CACHE_DIR") == "1"
    home = env["HOME"]
    assert home.startswith("/home/"), home
    assert env["LORAPIPE_CACHE"].startswith(home + "/") and env["HF_HOME"].startswith(home + "/")
    setup = " ".join(dockerfile.expand(i.value, env) for i in dockerfile.all("RUN"))
    assert f"--uid {user}" in setup.replace('"', "") and f"chown -R {user}" in setup.replace(
        '"', ""
    ), "the user and its home are not created"


def test_entrypoint_is_lorapipe(dockerfile: Dockerfile) -> None:
    entrypoints = dockerfile.all("ENTRYPOINT")
    assert entrypoints and exec_form(entrypoints[-1].value) == ["lorapipe"]


def test_versions_are_pinned_args(dockerfile: Dockerfile) -> None:
    assert dockerfile.args["TORCH_VERSION"] == "2.13.0"
    runs = " ".join(i.value for i in dockerfile.all("RUN"))
    assert '"torch==${TORCH_VERSION}"' in runs and "${TORCH_INDEX_URL}" in runs
    for name, value in dockerfile.args.items():
        if name.endswith("_VERSION"):
            assert re.fullmatch(r"\d+(\.\d+)+", value), f"ARG {name}={value!r} is not a pin"
    labels = " ".join(i.value for i in dockerfile.all("LABEL"))
    for key in ("title", "version", "source", "revision", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    assert f'title="lorapipe-{dockerfile.path.name.split(".")[0]}"' in labels


def test_each_image_installs_its_flavour() -> None:
    base, tagger, torch = (parse_dockerfile(DOCKERFILES[n]) for n in ("base", "tagger", "torch"))
    assert base.args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert tagger.args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert torch.args["CUDA_VARIANT"] == "cu128"
    assert torch.args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cu128"
    installs = {
        name: " ".join(i.value for i in d.all("RUN") if "/src" in i.value)
        for name, d in (("base", base), ("tagger", tagger), ("torch", torch))
    }
    assert "pip install /src" in installs["base"] and "pip install /src" in installs["torch"]
    assert 'pip install "/src[tagger]"' in installs["tagger"]
    for package in ("tensorflow", "tensorflow-io", "deepdanbooru"):
        assert f"{package}==" in " ".join(i.value for i in tagger.all("RUN")), package


# --------------------------------------------------------------------------- names and tags


def component_images(env: dict[str, str]) -> dict[str, str]:
    """components.images as imported with ``env`` (in a subprocess: it reads env at import)."""
    code = (
        "import json, components.images as i; "
        "print(json.dumps({n: getattr(i, n) for n in ('BASE_IMAGE', 'TAGGER_IMAGE', 'TORCH_IMAGE')}))"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LORAPIPE_")}
    clean["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src")])
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode and "No module named 'components" in result.stderr:
        pytest.skip("components/images.py is not there yet")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def make_dry_run(*args: str, env: dict[str, str] | None = None) -> list[list[str]]:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LORAPIPE_")}
    for name in ("REGISTRY", "TAG", "CONTAINER_TOOL", "CUDA_VARIANT", "MAKEFLAGS", "MAKELEVEL"):
        clean.pop(name, None)
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", *args],
        cwd=ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def built_tags(commands: list[list[str]]) -> dict[str, str]:
    """{Dockerfile stem: -t tag} of the build commands."""
    tags = {}
    for command in commands:
        dockerfile = command[command.index("-f") + 1]
        assert command[-1] == ".", "the build context is the repository root"
        assert (ROOT / dockerfile).is_file(), dockerfile
        tags[Path(dockerfile).name.removesuffix(".Dockerfile")] = command[command.index("-t") + 1]
    return tags


def test_make_images_tags_what_the_components_name() -> None:
    commands = make_dry_run("images", "REGISTRY=registry.example.com/ml", "TAG=2026-11")
    assert all(c[:2] == ["docker", "build"] or c[:2] == ["buildah", "bud"] for c in commands)
    names = component_images(
        {"LORAPIPE_REGISTRY": "registry.example.com/ml", "LORAPIPE_IMAGE_TAG": "2026-11"}
    )
    tags = built_tags(commands)
    assert set(tags) == set(DOCKERFILES)
    assert {IMAGE_CONSTANTS[name]: tag for name, tag in tags.items()} == names
    assert names["BASE_IMAGE"] == "registry.example.com/ml/lorapipe-base:2026-11"


def test_make_images_defaults_match_the_components() -> None:
    tags = built_tags(make_dry_run("images", "CONTAINER_TOOL=docker"))
    names = component_images({})
    assert {IMAGE_CONSTANTS[name]: tag for name, tag in tags.items()} == names
    from lorapipe import __version__

    assert names["TORCH_IMAGE"] == f"ghcr.io/lorapipe/lorapipe-torch:{__version__}"
    # LORAPIPE_* (what components/images.py reads) steer `make images` too
    steered = {"LORAPIPE_REGISTRY": "r.example", "LORAPIPE_IMAGE_TAG": "7"}
    tags = built_tags(make_dry_run("images", env=steered))
    assert tags["tagger"] == "r.example/lorapipe-tagger:7"


def test_make_images_uses_buildah_bud_without_docker() -> None:
    commands = make_dry_run("images", "CONTAINER_TOOL=buildah")
    assert len(commands) == 3 and all(c[:2] == ["buildah", "bud"] for c in commands)
    torch_build = next(c for c in commands if "images/torch.Dockerfile" in c)
    assert "CUDA_VARIANT=cu128" in torch_build
    pushes = make_dry_run("push-images", "REGISTRY=r.example", "TAG=1", "CONTAINER_TOOL=buildah")
    assert sorted(c[-1] for c in pushes) == [
        "r.example/lorapipe-base:1",
        "r.example/lorapipe-tagger:1",
        "r.example/lorapipe-torch:1",
    ]
    assert all(c[:2] == ["buildah", "push"] for c in pushes)
