"""Translate the Earthfile subset rsnap's Earthfile uses into a Dockerfile (tests only).

Earthly cannot be installed here, but it compiles Earthfiles to BuildKit; so the tests compile
the same subset to a Dockerfile by hand, following Earthly's documented semantics, and run it
through the same BuildKit. Supported, everything else raises TranslateError:

* ``VERSION`` (ignored), the base recipe (commands before the first target), targets
  ``name:`` -> stages; a target without ``FROM`` starts from the base recipe.
* ``FROM image`` (optionally mapped through ``images``, e.g. to a locally built image) and
  ``FROM +target``.
* ``ARG [--required] name[=default]``: in targets a Docker ARG (overridable by ``args``); in
  functions the value comes from ``DO +F --name=value`` or the default, is *local* to the body
  (Earthly: function ARGs do not leak into the caller), is substituted into flags and paths,
  and is set as a shell variable in front of each RUN of the body.
* ``FUNCTION`` bodies are inlined at ``DO +F --k=v ...`` and run in the caller's context:
  caller's image, WORKDIR, ENV; their ENV/WORKDIR changes persist in the caller.
* ``ENV``, ``WORKDIR``; ``COPY [--dir] [--keep-ts] src... dest`` from the context or
  ``COPY +target/artifact dest``; ``--dir`` copies the directory itself (Earthly), ``--keep-ts``
  is what this BuildKit's COPY does anyway (checked: it keeps the context's mtimes), while
  Earthly without ``--keep-ts`` resets them (not modelled: rsnap re-times sources by content).
* ``RUN [--mount=type=cache,...] cmd``: relative mount targets resolved against WORKDIR, ARGs
  and ENV values in mount options expanded by the translator (this BuildKit's frontend does
  not), so ``RUN --mount=$RSNAP_TARGET_CACHE`` works as in lib/rust.
* ``RUN --secret ENV=id`` / ``--secret id``: a required secret mount of ``id`` whose value the
  command gets as ``$ENV`` (exported in front of it); an empty ``id`` drops the secret, as in
  Earthly. Build with ``docker build --secret id=<id>,...`` where Earthly takes
  ``earthly --secret <id>``.
* Target ARG values (translation-time: ``args`` or the default) expand in ``DO`` arguments.
* ``SAVE ARTIFACT src [dest] [AS LOCAL path]``: artifacts go to a ``<target>--artifacts``
  stage (what ``COPY +target/...`` reads), ``AS LOCAL`` ones to ``<target>--local``, to be
  built with ``-o type=local,dest=<Earthfile dir>``.

Not modelled: IMPORT and remote references, global ARGs, builtin ARGs, SAVE IMAGE, IF/FOR,
WITH DOCKER, --push, Earthly's own cache of function calls, ARG values with shell syntax.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from dataclasses import dataclass, field


class TranslateError(Exception):
    pass


@dataclass
class Block:
    name: str
    lines: list[str] = field(default_factory=list)

    @property
    def is_function(self) -> bool:
        return bool(self.lines) and self.lines[0] == "FUNCTION"


def parse(text: str) -> tuple[list[str], dict[str, Block]]:
    """Base recipe lines and blocks (targets, functions) with continuations joined."""
    base, blocks, cur, pending = [], {}, None, ""
    for raw in text.splitlines():
        if pending:
            raw = pending + " " + raw.strip()
            pending = ""
        if raw.rstrip().endswith("\\"):
            pending = raw.rstrip()[:-1].rstrip()
            continue
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not raw[0].isspace():
            if m := re.fullmatch(r"([A-Za-z][A-Za-z0-9_.-]*):", stripped):
                cur = blocks[m[1]] = Block(m[1])
                continue
            if cur is not None:
                raise TranslateError(f"unindented command inside target {cur.name}: {stripped}")
            base.append(stripped)
        else:
            if cur is None:
                raise TranslateError(f"indented command outside a target: {stripped}")
            cur.lines.append(stripped)
    if pending:
        raise TranslateError("file ends in a line continuation")
    return base, blocks


def _subst(text: str, values: dict[str, str]) -> str:
    def rep(m):
        name = m[1] or m[2]
        return values[name] if name in values else m[0]
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", rep, text)


def _split_flags(rest: str) -> tuple[list[str], str]:
    """Leading --flags; `--secret` takes the next word as its value (two list items)."""
    flags = []
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        flags.append(flag)
        if flag == "--secret":
            value, _, rest = rest.lstrip().partition(" ")
            flags.append(value)
        rest = rest.lstrip()
    return flags, rest


class Translator:
    def __init__(self, text: str, images: dict[str, str] | None = None, args: dict[str, str] | None = None):
        self.base, self.blocks = parse(text)
        self.images = images or {}
        self.args = args or {}
        self.out: list[str] = []
        self.done: set[str] = set()
        self.artifacts: dict[str, list[tuple[str, str]]] = {}
        self.local: dict[str, list[tuple[str, str]]] = {}

    # -- stages --------------------------------------------------------------------------------
    def stage(self, name: str) -> str:
        """Emit `name` (and what it depends on) once; returns the stage name."""
        if name in self.done:
            return name
        if name != "base":
            block = self.blocks.get(name)
            if block is None:
                raise TranslateError(f"no target +{name}")
            if block.is_function:
                raise TranslateError(f"+{name} is a FUNCTION; call it with DO")
            lines = block.lines
        else:
            lines = [l for l in self.base if not l.startswith("VERSION ")]
        self.done.add(name)
        body: list[str] = []
        st = {"workdir": "/", "from": False, "name": name, "env": {}, "args": {}}
        if not lines or not lines[0].startswith("FROM "):
            if name == "base":
                raise TranslateError("the base recipe needs a FROM")
            body.append(f"FROM {self.stage('base')} AS {name}")
            st["from"] = True
        for line in lines:
            self.command(line, st, body, fn_values=None)
        self.out += body + [""]
        for kind, table in (("artifacts", self.artifacts), ("local", self.local)):
            if table.get(name):
                self.out.append(f"FROM scratch AS {name}--{kind}")
                self.out += [f"COPY --from={name} {src} {dest}" for src, dest in table[name]]
                self.out.append("")
        return name

    def command(self, line: str, st: dict, body: list[str], fn_values: dict | None) -> None:
        word, _, rest = line.partition(" ")
        rest = rest.strip()
        if fn_values is not None and word not in ("RUN", "ARG", "FUNCTION", "DO"):
            rest = _subst(rest, fn_values)
        if word == "FROM":
            if st["from"]:
                raise TranslateError(f"second FROM in +{st['name']} (not supported)")
            src = self.stage(rest[1:]) if rest.startswith("+") else self.images.get(rest, rest)
            body.append(f"FROM {src} AS {st['name']}")
            st["from"] = True
        elif word == "ARG":
            flags, decl = _split_flags(rest)
            if set(flags) - {"--required"}:
                raise TranslateError(f"ARG flags {flags} not supported")
            name, eq, default = decl.partition("=")
            if fn_values is not None:
                if name not in fn_values:
                    if "--required" in flags:
                        raise TranslateError(f"function argument {name} is required")
                    fn_values[name] = _subst(default, fn_values)
                return
            if "--required" in flags and name not in self.args:
                raise TranslateError(f"target argument {name} is required")
            value = self.args.get(name, default)
            st["args"][name] = value
            body.append(f"ARG {name}={shlex.quote(value)}" if (eq or name in self.args) else f"ARG {name}")
        elif word == "ENV":
            k, v = (rest.split("=", 1) if "=" in rest.split(" ")[0] else rest.split(None, 1))
            st["env"][k] = " ".join(shlex.split(v))
            body.append(f"ENV {k}={shlex.quote(v.strip())}" if not re.fullmatch(r"[\w/.:=$-]+", v) else f"ENV {k}={v}")
        elif word == "WORKDIR":
            st["workdir"] = posixpath.join(st["workdir"], rest)
            body.append(f"WORKDIR {rest}")
        elif word == "COPY":
            flags, spec = _split_flags(rest)
            if set(flags) - {"--dir", "--keep-ts"}:
                raise TranslateError(f"COPY flags {flags} not supported")
            *srcs, dest = shlex.split(spec)
            for src in srcs:
                if src.startswith("+"):
                    target, _, path = src[1:].partition("/")
                    body.append(f"COPY --from={self.stage(target) and target + '--artifacts'} /{path} {dest}")
                elif "--dir" in flags:
                    body.append(f"COPY {src} {posixpath.join(dest, posixpath.basename(src.rstrip('/')))}/")
                else:
                    body.append(f"COPY {src} {dest}")
        elif word == "RUN":
            flags, cmd = _split_flags(rest)
            mounts, exports = [], []
            flags = iter(flags)
            for flag in flags:
                if flag == "--secret":    # --secret ENV=id | id (flag and value are two words)
                    env, _, sid = _subst(next(flags, ""), fn_values or {}).partition("=")
                    sid = sid if _ else env
                    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env) or not re.fullmatch(r"[\w.-]*", sid):
                        raise TranslateError(f"RUN --secret {env}={sid}: not an env var name and secret id")
                    if sid:               # Earthly: an empty id disables the secret
                        mounts.append(f"--mount=type=secret,id={sid},required=true")
                        exports.append(f'{env}="$(cat /run/secrets/{sid})"; export {env};')
                    continue
                if not flag.startswith("--mount="):
                    raise TranslateError(f"RUN flag {flag} not supported")
                # ENV values expand in flags (lib/rust's `RUN --mount=$EARTHLY_RUST_TARGET_CACHE`)
                opts = dict(o.split("=", 1) for o in _subst(flag[8:], {**st["env"], **(fn_values or {})}).split(","))
                if opts.get("type") != "cache":
                    raise TranslateError(f"RUN mount {flag} not supported (cache mounts only)")
                opts["target"] = posixpath.join(st["workdir"], opts["target"])
                mounts.append("--mount=" + ",".join(f"{k}={v}" for k, v in opts.items()))
            if fn_values:
                cmd = " ".join(f"{k}={shlex.quote(v)};" for k, v in fn_values.items()) + " " + cmd
            if exports:
                cmd = " ".join(exports) + " " + cmd
            body.append(" ".join(["RUN", *mounts, cmd]))
        elif word == "DO":
            call = shlex.split(rest)
            if not call[0].startswith("+"):
                raise TranslateError(f"DO {call[0]}: only local functions (+NAME) are supported")
            block = self.blocks.get(call[0][1:])
            if block is None or not block.is_function:
                raise TranslateError(f"DO {call[0]}: no such FUNCTION")
            values = {}
            for a in call[1:]:
                m = re.fullmatch(r"--([A-Za-z_][A-Za-z0-9_]*)=(.*)", a, re.S)
                if not m:
                    raise TranslateError(f"DO argument {a!r}: use --name=value")
                values[m[1]] = _subst(m[2], fn_values if fn_values is not None else st["args"])
            for fline in block.lines[1:]:
                self.command(fline, st, body, fn_values=values)
        elif word == "SAVE":
            m = re.fullmatch(r"ARTIFACT (\S+)(?: (?!AS\b)(\S+))?(?: AS LOCAL (\S+))?", rest)
            if not m:
                raise TranslateError(f"SAVE {rest}: only SAVE ARTIFACT src [dest] [AS LOCAL path]")
            src = posixpath.join(st["workdir"], m[1])
            self.artifacts.setdefault(st["name"], []).append((src, "/" + (m[2] or "").lstrip("/")))
            if m[3]:
                self.local.setdefault(st["name"], []).append((src, "/" + m[3].lstrip("/")))
        elif word == "FUNCTION":
            raise TranslateError("FUNCTION outside the first line of a block")
        else:
            raise TranslateError(f"{word}: not in the supported Earthfile subset")


def translate(text: str, target: str, images: dict[str, str] | None = None,
              args: dict[str, str] | None = None) -> str:
    """Dockerfile for `+target`; build its `<target>--local` stage to get the AS LOCAL files."""
    t = Translator(text, images, args)
    t.stage(target)
    return "\n".join(t.out) + "\n"
