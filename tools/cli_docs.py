"""Man pages and shell completion, generated from the same source as `--help`.

    python tools/cli_docs.py            # rewrite everything under share/
    python tools/cli_docs.py --check    # exit 1 naming each file that is not current

The argparse parsers (ximd.cli.build_parser, xim_router.cli.build_parser) give
the commands, options, choices and help texts; ximd.config.SCHEMA gives
agent.toml(5); ximd/exitcodes.py gives ximd's EXIT STATUS. tests/unit/test_cli_docs.py
checks that the shipped files are current, that groff renders the pages without a
warning and that bash completes what the parsers accept. The packages install
share/ (packaging/debian/xerotier-agent.install and .manpages, the RPM spec).

Sections: ximd(8) and xim-router(8). Both are daemons whose other commands
administer them (enroll a node, mint join keys, revoke agents) and mostly need
root or the service's group; Debian Policy §12.1 puts "system administration
commands and daemons" in section 8, whatever directory the program is in.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xim_proto import __version__  # noqa: E402
from xim_router import cli as router_cli  # noqa: E402
from ximd import cli as ximd_cli  # noqa: E402
from ximd import config as configmod  # noqa: E402
from ximd.configdoc import literal  # noqa: E402

SHARE = ROOT / "share"
SOURCE = f"xerotier-agent {__version__}"


# ---------------------------------------------------------------- the parsers, walked


@dataclass
class Command:
    path: tuple[str, ...]                 # ("model", "pull")
    parser: argparse.ArgumentParser
    help: str
    subcommands: list[str]

    @property
    def name(self) -> str:
        return " ".join(self.path)


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = (), help_text: str = "") -> Iterator[Command]:
    """Every command of a parser, the program itself first, subcommands depth first."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    names = [name for action in subs for name in action.choices]
    yield Command(path, parser, help_text, names)
    for action in subs:
        helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
        for name, sub in action.choices.items():
            yield from walk(sub, (*path, name), helps.get(name, ""))


def options(parser: argparse.ArgumentParser, leave_out: frozenset[str] = frozenset()) -> list[argparse.Action]:
    """The options shown for a command: no suppressed ones, none of the shared ones in `leave_out`."""
    return [a for a in parser._actions
            if a.option_strings and a.help != argparse.SUPPRESS and not set(a.option_strings) & leave_out]


def positionals(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]


def takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def help_of(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help text as --help prints it (%(default)s and the like expanded)."""
    return parser._get_formatter()._expand_help(action) if action.help else ""


def value_name(action: argparse.Action) -> str:
    if action.choices is not None:
        return "{" + ",".join(map(str, action.choices)) + "}"
    return action.metavar or action.dest.upper()


def wants_files(action: argparse.Action) -> bool:
    """Whether an option's value (or a positional) is a path, to be completed as one."""
    return any(word in (action.metavar or "") for word in ("PATH", "DIR"))


# ---------------------------------------------------------------- roff


def roff(text: str) -> str:
    """Text safe for groff's man macros: backslashes, leading dots and quotes, non-ASCII as \\[uXXXX]."""
    text = text.replace("\\", "\\e")
    text = "".join(ch if ord(ch) < 128 else f"\\[u{ord(ch):04X}]" for ch in text)
    return "\n".join(("\\&" + line) if line[:1] in (".", "'") else line for line in text.split("\n"))


def flag(text: str) -> str:
    """An option or command name: its hyphens are minus signs, as man(7) wants for what is typed."""
    return roff(text).replace("-", "\\-")


def option_item(parser: argparse.ArgumentParser, action: argparse.Action) -> list[str]:
    names = ", ".join(f"\\fB{flag(o)}\\fR" for o in action.option_strings)
    value = f" \\fI{roff(value_name(action))}\\fR" if takes_value(action) else ""
    return [".TP", names + value, roff(help_of(parser, action)) or "\\&"]


def synopsis(cmd: Command, prog: str) -> str:
    words = [f"\\fB{flag(' '.join((prog, *cmd.path)))}\\fR"]
    if cmd.subcommands:
        words.append("\\fICOMMAND\\fR" if not cmd.path else "\\fISUBCOMMAND\\fR")
    if options(cmd.parser):
        words.append("[\\fIOPTIONS\\fR]")
    for action in positionals(cmd.parser):
        shown = f"\\fI{roff(action.metavar or action.dest.upper())}\\fR"
        words.append(f"[{shown}]" if action.nargs in ("?", "*") else shown)
    return " ".join(words)


def exit_statuses() -> list[tuple[int, str, str]]:
    """(status, name, what it means) from ximd/exitcodes.py: its trailing or leading comments."""
    rows, comments = [], []
    for line in (ROOT / "ximd" / "exitcodes.py").read_text().splitlines():
        match = re.match(r"(EX_\w+) = (\d+)\s*(?:#\s*(.*))?$", line)
        if match:
            rows.append((int(match.group(2)), match.group(1),
                         match.group(3) or " ".join(comments) or ("success" if match.group(2) == "0" else "")))
            comments = []
        elif line.startswith("#"):
            comments.append(line.lstrip("# ").strip())
        else:
            comments = []
    return sorted(rows)


def man_page(prog: str, parser: argparse.ArgumentParser, summary: str, shared_flags: argparse.ArgumentParser | None,
             extra: list[str]) -> str:
    shared = frozenset(o for a in (shared_flags._actions if shared_flags else []) for o in a.option_strings)
    shared -= {"-h", "--help"}
    commands = list(walk(parser))
    lines = [f'.TH {prog.upper()} 8 "" "{SOURCE}" "System Administration"',
             ".SH NAME", f"{flag(prog)} \\- {roff(summary)}",
             ".SH SYNOPSIS"]
    for cmd in commands:
        if not cmd.subcommands or options(cmd.parser, shared | {"-h", "--help"}):
            lines += [synopsis(cmd, prog), ".br"]
    lines += [".SH DESCRIPTION", roff(parser.description or "")]
    top = options(parser)
    if top:
        lines += [".SH OPTIONS"] + [line for action in top for line in option_item(parser, action)]
    lines.append(".SH COMMANDS")
    for cmd in commands[1:]:
        if cmd.subcommands and not options(cmd.parser, shared | {"-h", "--help"}):
            continue
        lines += [f'.SS "{flag(prog + " " + cmd.name)}"']
        text = cmd.parser.description or cmd.help
        if text:
            lines += [roff(text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")), ".PP"]
        own = options(cmd.parser, shared | {"-h", "--help"})
        for action in positionals(cmd.parser):
            lines += [".TP", f"\\fI{roff(action.metavar or action.dest.upper())}\\fR",
                      roff(help_of(cmd.parser, action)) or "\\&"]
        for action in own:
            lines += option_item(cmd.parser, action)
        if shared and shared & {o for a in options(cmd.parser) for o in a.option_strings}:
            lines += [".PP", "It takes the configuration options (see \\fBCONFIGURATION OPTIONS\\fR)."]
    if shared_flags is not None:
        lines += [".SH CONFIGURATION OPTIONS",
                  roff("The commands that read the configuration take these; a flag wins over the "
                       "environment, the drop-ins and agent.toml (see agent.toml(5))."),
                  ".PP"]
        lines += [line for action in options(shared_flags, frozenset({"-h", "--help"}))
                  for line in option_item(shared_flags, action)]
    lines += extra
    return "\n".join(lines) + "\n"


def ximd_page() -> str:
    statuses = [line for code, name, what in exit_statuses()
                for line in (".TP", f"\\fB{code}\\fR", roff(f"{name}: {what}" if what else name))]
    extra = [".SH EXIT STATUS", *statuses,
             ".SH FILES",
             ".TP", "\\fI/etc/xerotier/agent.toml\\fR", roff("The configuration (0640 root:xerotier); see agent.toml(5)."),
             ".TP", "\\fI/etc/xerotier/agent.toml.d/*.toml\\fR", "Drop-ins, merged in name order.",
             ".TP", "\\fI/var/lib/xerotier/enrollment/identity.json\\fR",
             roff("The node's identity (0600), written by enrollment."),
             ".TP", "\\fI/run/ximd/control.sock\\fR", roff("What ximd status and ximd reexec ask the daemon through."),
             # xerotier-engine-install's default --prefix (tests/unit/test_man_pages.py holds them equal).
             ".TP", f"\\fI{roff(str(Path(configmod.SCHEMA['engine.python'].default).parents[1]))}\\fR",
             roff("The vLLM engine environment ximd starts (engine.python is its bin/python), which the package "
                  "does not contain: xerotier-engine-install(8) builds it; then systemctl restart ximd."),
             ".SH ENVIRONMENT",
             roff("Every setting has an environment variable (agent.toml(5) names each); "
                  f"{configmod.CONFIG_PATH_ENV} names the configuration file. "
                  "HTTPS_PROXY, HTTP_PROXY and NO_PROXY apply to enrollment and token renewal."),
             ".SH SEE ALSO",
             "\\fBagent.toml\\fR(5), \\fBxerotier-engine-install\\fR(8), \\fBxim-router\\fR(8), "
             "\\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1)"]
    return man_page("ximd", ximd_cli.build_parser(), "the systemd-native XIM node agent",
                    ximd_cli.setting_flags(), extra)


def router_page() -> str:
    extra = [".SH EXIT STATUS",
             ".TP", "\\fB0\\fR", "Success.",
             ".TP", "\\fB1\\fR", roff("The command failed (no such agent or key; the router could not start)."),
             ".TP", "\\fB2\\fR", roff("A bad or unsafe command line."),
             ".TP", "\\fB141\\fR", roff("Standard output's reader went away (`xim-router agents | head`)."),
             ".SH ENVIRONMENT",
             ".TP", "\\fBXIM_ROUTER_STATE_DIR\\fR", roff(f"The state directory (default {router_cli.DEFAULT_STATE_DIR})."),
             ".SH SEE ALSO", "\\fBximd\\fR(8), \\fBagent.toml\\fR(5)"]
    return man_page("xim-router", router_cli.build_parser(), "the open router that ximd nodes join", None, extra)


def config_page() -> str:
    from ximd.configdoc import HEADER
    lines = ['.TH AGENT.TOML 5 "" "' + SOURCE + '" "File Formats"',
             ".SH NAME", "agent.toml \\- configuration of ximd, the XIM node agent",
             ".SH SYNOPSIS", "\\fI/etc/xerotier/agent.toml\\fR", ".br", "\\fI/etc/xerotier/agent.toml.d/*.toml\\fR",
             ".SH DESCRIPTION"]
    header = [line.lstrip("#").strip() for line in HEADER.splitlines()[2:]]
    lines += [roff(" ".join(p.split())) + "\n.PP" for p in "\n".join(header).split("\n\n") if p.strip()]
    lines.append(roff("A key belongs in its [section]; one written above the first section header is refused "
                      "with where it belongs."))
    for section in configmod.SECTIONS:
        lines.append(f'.SS "[{section}]"')
        for name, info in configmod.SCHEMA.items():
            if not name.startswith(section + "."):
                continue
            key = name.split(".", 1)[1]
            lines += [".TP", f"\\fB{roff(key)}\\fR = \\fI{roff(literal(info.default))}\\fR",
                      roff(f"{info.doc} Type: {info.kind.expected}." + (" A secret: shown masked." if info.secret else ""))]
            where = ([f"environment \\fB{roff(info.env)}\\fR"] if info.env else []) + \
                    ([f"flag \\fB{flag(info.flag)}\\fR"] if info.flag else [])
            if name in configmod.SYSTEMD_DIRECTORIES:
                where.append(f"systemd's \\fB${configmod.SYSTEMD_DIRECTORIES[name]}\\fR")
            if where:
                lines += [".br", "Also: " + ", ".join(where) + "."]
    lines += [".SH SEE ALSO", "\\fBximd\\fR(8), \\fBxerotier-engine-install\\fR(8)"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- completion


def tables(parser: argparse.ArgumentParser) -> dict[str, tuple[list[str], list[str], dict[str, list[str]], list[str]]]:
    """Per command path: (subcommands, options, {option taking a value: its choices}, options taking a path)."""
    out = {}
    for cmd in walk(parser):
        opts = options(cmd.parser)
        valued = {o: [str(c) for c in (a.choices or [])] for a in opts if takes_value(a) for o in a.option_strings}
        files = [o for a in opts if wants_files(a) for o in a.option_strings]
        out[cmd.name] = (cmd.subcommands, [o for a in opts for o in a.option_strings], valued, files)
    return out


def shell_case(prefix: str, rows: dict[str, str], zsh: bool) -> list[str]:
    body = [f"{prefix}() {{", '    case "$1" in']
    for key, words in rows.items():
        if words:
            body.append(f'        ("{key}") {"reply=(" + words + ")" if zsh else "echo " + repr(words)};;')
    return [*body, "    esac", "}"]


def completion(prog: str, parser: argparse.ArgumentParser, zsh: bool) -> str:
    fn = "_" + prog.replace("-", "_")
    table = tables(parser)
    subs = {path: " ".join(s) for path, (s, _, _, _) in table.items()}
    opts = {path: " ".join(o) for path, (_, o, _, _) in table.items()}
    valued = {f"{path}|{o}".lstrip(): " ".join(c) or "-" for path, (_, _, v, _) in table.items() for o, c in v.items()}
    files = {f"{path}|{o}": "y" for path, (_, _, _, f) in table.items() for o in f}
    head = [f"#compdef {prog}" if zsh else f"# bash completion for {prog}",
            f"# Generated by tools/cli_docs.py from {prog}'s argparse parser; do not edit.", ""]
    lines = head
    lines += shell_case(f"{fn}_subcommands", subs, zsh) + shell_case(f"{fn}_options", opts, zsh)
    lines += shell_case(f"{fn}_values", valued, zsh) + shell_case(f"{fn}_files", files, zsh)
    if zsh:
        lines += [f"{fn}() {{",
                  "    local cmdpath='' w i skip=0 cur=${words[CURRENT]} prev=${words[CURRENT-1]}",
                  "    local -a reply",
                  "    for ((i = 2; i < CURRENT; i++)); do",
                  "        w=${words[i]}",
                  "        if ((skip)); then skip=0; continue; fi",
                  "        if [[ $w == -* ]]; then",
                  f'            reply=(); {fn}_values "$cmdpath|$w"; [[ $w != *=* && -n $reply ]] && skip=1',
                  "            continue",
                  "        fi",
                  f'        reply=(); {fn}_subcommands "$cmdpath"',
                  "        if ((${reply[(Ie)$w]})); then cmdpath=${cmdpath:+$cmdpath }$w; fi",
                  "    done",
                  f'    reply=(); {fn}_values "$cmdpath|$prev"',
                  "    if ((CURRENT > 2)) && [[ -n $reply ]]; then",
                  f'        if [[ $reply == - ]]; then reply=(); {fn}_files "$cmdpath|$prev"; [[ -n $reply ]] && _files; return; fi',
                  "        compadd -- $reply; return",
                  "    fi",
                  f'    if [[ $cur == -* ]]; then reply=(); {fn}_options "$cmdpath"; compadd -- $reply; return; fi',
                  f'    reply=(); {fn}_subcommands "$cmdpath"',
                  "    if [[ -n $reply ]]; then compadd -- $reply; else _files; fi",
                  "}",
                  "",
                  f'{fn} "$@"']
    else:
        lines += [f"{fn}() {{",
                  '    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]} cmdpath="" w i skip=0',
                  "    COMPREPLY=()",
                  "    for ((i = 1; i < COMP_CWORD; i++)); do",
                  "        w=${COMP_WORDS[i]}",
                  "        if ((skip)); then skip=0; continue; fi",
                  "        if [[ $w == -* ]]; then",
                  f'            [[ $w != *=* && -n $({fn}_values "$cmdpath|$w") ]] && skip=1',
                  "            continue",
                  "        fi",
                  f'        [[ " $({fn}_subcommands "$cmdpath") " == *" $w "* ]] && cmdpath=${{cmdpath:+$cmdpath }}$w',
                  "    done",
                  f'    local values=$({fn}_values "$cmdpath|$prev")',
                  "    if ((COMP_CWORD > 1)) && [[ -n $values ]]; then",
                  "        if [[ $values == - ]]; then",
                  f'            [[ -n $({fn}_files "$cmdpath|$prev") ]] && {{ compopt -o filenames 2>/dev/null; '
                  'mapfile -t COMPREPLY < <(compgen -f -- "$cur"); }',
                  "            return 0",
                  "        fi",
                  '        mapfile -t COMPREPLY < <(compgen -W "$values" -- "$cur"); return 0',
                  "    fi",
                  "    if [[ $cur == -* ]]; then",
                  f'        mapfile -t COMPREPLY < <(compgen -W "$({fn}_options "$cmdpath")" -- "$cur"); return 0',
                  "    fi",
                  f'    local subs=$({fn}_subcommands "$cmdpath")',
                  "    if [[ -n $subs ]]; then",
                  '        mapfile -t COMPREPLY < <(compgen -W "$subs" -- "$cur")',
                  "    else",
                  '        compopt -o filenames 2>/dev/null; mapfile -t COMPREPLY < <(compgen -f -- "$cur")',
                  "    fi",
                  "}",
                  "",
                  f"complete -F {fn} {prog}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the files


def generated() -> dict[Path, str]:
    """Every generated file (relative to the repository) and what it must hold."""
    parsers = {"ximd": ximd_cli.build_parser(), "xim-router": router_cli.build_parser()}
    out = {Path("share/man/ximd.8"): ximd_page(), Path("share/man/xim-router.8"): router_page(),
           Path("share/man/agent.toml.5"): config_page()}
    for prog, parser in parsers.items():
        out[Path(f"share/bash-completion/{prog}")] = completion(prog, parser, zsh=False)
        out[Path(f"share/zsh/_{prog}")] = completion(prog, parser, zsh=True)
    return out


def main(argv: list[str]) -> int:
    check = argv[1:] == ["--check"]
    stale = []
    for relative, text in generated().items():
        path = ROOT / relative
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(relative))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for name in stale:
        print(f"not current: {name} (regenerate: python tools/cli_docs.py)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
