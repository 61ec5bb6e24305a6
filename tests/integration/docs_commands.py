"""The commands of README.md and docs/*.md, as a user would type them, and how CI exercises each.

Every command (a ```bash line, or a `$ ` line of a ```console block) must be exercised exactly one way:
``cluster`` (kubectl/helm against the emulator), ``cli``, ``test`` (a named test runs the same
invocation) or ``setup``. The rules: docs/testing.md ("How the docs are tested").
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMMAND_LANGUAGES = {"bash", "sh", "shell", "console"}


@dataclass(frozen=True)
class DocCommand:
    doc: str                 # path relative to the repository
    line: int                # 1-based line of the command's first line
    text: str                # as written (continuations joined, comments dropped)
    argv: tuple[str, ...]
    output: tuple[str, ...] = field(default=())  # sample output shown after it (console blocks)

    def where(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _split(text: str) -> tuple[str, ...]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=False)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return tuple(lexer)


def extract(path: Path) -> list[DocCommand]:
    """Every command of one Markdown document, in order."""
    rel = str(path.relative_to(REPO))
    lines = path.read_text().splitlines()
    commands: list[DocCommand] = []
    language: str | None = None
    index = 0
    while index < len(lines):
        line = lines[index]
        fence = re.match(r"^\s*```\s*([A-Za-z0-9_+-]*)", line)
        if fence:
            language = None if language is not None else (fence.group(1).lower() or "text")
            index += 1
            continue
        if language in ("bash", "sh", "shell") and line.strip() and not line.strip().startswith("#"):
            start, text = index, line.rstrip()
            while text.endswith("\\") and index + 1 < len(lines):
                index += 1
                text = text[:-1] + " " + lines[index].strip()
            argv = _split(text)
            if argv:
                commands.append(DocCommand(rel, start + 1, shlex.join(argv), argv))
        elif language == "console" and line.startswith("$ "):
            start, text = index, line[2:].rstrip()
            while text.endswith("\\") and index + 1 < len(lines):
                index += 1
                text = text[:-1] + " " + lines[index].strip()
            output = []
            while index + 1 < len(lines) and not lines[index + 1].startswith("$ ") \
                    and not lines[index + 1].lstrip().startswith("```"):
                index += 1
                output.append(lines[index])
            argv = _split(text)
            if argv:
                commands.append(DocCommand(rel, start + 1, shlex.join(argv), argv, tuple(output)))
        index += 1
    return commands


def all_commands() -> list[DocCommand]:
    return [command for path in documents() for command in extract(path)]


# --- how each command is exercised ------------------------------------------------------------------

CLUSTER_KUBECTL = {"apply", "get", "describe", "explain", "delete", "wait", "create", "label", "annotate",
                   "patch", "api-resources", "config"}
CLUSTER_HELM = {"install", "upgrade", "uninstall", "list", "status", "template", "lint", "get"}
CLI_KUBETUNE = {"validate", "render"}

# (command prefix as argv, the file that runs it, a string that file must contain: the same invocation)
RUN_BY = [
    (("make", "test"), ".ci/run", "make test"),
    (("make", "run"), "tests/local/test_local_serve_quickstart.py", '"bash", "scripts/run-default.sh"'),
    (("make", "serve"), "tests/local/test_local_serve_quickstart.py", '"bash", "scripts/serve-default.sh"'),
    (("make", "sweep"), "tests/local/test_readme_commands.py", 'make_recipe("sweep")'),
    (("make", "lint"), "scripts/test.sh", "lint-imports"),
    (("kubetune", "generate"), "scripts/test.sh", "kubetune generate --check"),
    (("kubetune", "local", "-f", "examples/finetunejob-local-intents.yaml"), "scripts/run-default.sh",
     "examples/finetunejob-local-intents.yaml"),
    (("kubetune", "local", "-f", "examples/adapterdeployment-local-intents.yaml"),
     "scripts/serve-default.sh", "examples/adapterdeployment-local-intents.yaml"),
    # tests/integration/test_operator_process.py and others start it through this helper
    (("kubetune", "operator"), "testing/kubetune_testing/operator_process.py", '"kubetune_operator.cli", "operator"'),
]
SETUP = {"git", "cd"}


def how(command: DocCommand) -> tuple[str, str]:
    """(way, detail) for a command; way "unexercised" when there is none."""
    argv = command.argv
    tool, verb = argv[0], (argv[1] if len(argv) > 1 else "")
    if tool == "kubectl" and verb in CLUSTER_KUBECTL and "-w" not in argv and "--watch" not in argv:
        return "cluster", ""
    if tool == "helm" and verb in CLUSTER_HELM:
        return "cluster", ""
    if tool == "kubetune" and verb in CLI_KUBETUNE:
        return "cli", ""
    if tool == "kubetune" and verb == "generate" and "--check" in argv:
        return "cli", ""
    for prefix, runner, needle in RUN_BY:
        if argv[:len(prefix)] == prefix:
            return "test", f"{runner} ({needle})"
    if tool in SETUP:
        return "setup", ""
    return "unexercised", ""
