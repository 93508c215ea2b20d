"""Every program the packages install has a man page that both recipes ship, and the
hand-written one (xerotier-engine-install(8)) documents what its script accepts.

Read from the recipes themselves (packaging/debian/*.install and *.manpages, the RPM
spec's %install and %files), so a new program without a page, or a page one recipe
forgets, fails here rather than in lintian or on a host. tests/unit/test_cli_docs.py
renders every page under share/man with groff and man.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from ximd import config as configmod

REPO = Path(__file__).resolve().parents[2]
DEBIAN = REPO / "packaging" / "debian"
SPEC = REPO / "packaging" / "rpm" / "xerotier-agent.spec"
INSTALLER = REPO / "packaging" / "engine" / "xerotier-engine-install"
INSTALLER_PAGE = REPO / "share" / "man" / "xerotier-engine-install.8"
PROGRAM_DIRS = ("usr/bin/", "usr/sbin/")


def deb_programs() -> dict[str, str]:
    """program -> the binary package whose .install puts it in /usr/bin or /usr/sbin."""
    out = {}
    for install in DEBIAN.glob("*.install"):
        for line in install.read_text().splitlines():
            words = line.split("#", 1)[0].split()
            from_tmp = len(words) == 1 and words[0].startswith(PROGRAM_DIRS)   # pybuild's, from debian/tmp
            copied = len(words) == 2 and words[1].rstrip("/") + "/" in PROGRAM_DIRS
            if from_tmp or copied:
                out[Path(words[0]).name] = install.stem
    return out


def spec_files_sections() -> dict[str, list[str]]:
    """binary package -> the lines of its %files section."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in SPEC.read_text().splitlines():
        if line.startswith("%"):
            head = line.split()
            if head[0] == "%files":
                current = head[2] if head[1:2] == ["-n"] else "xerotier-agent"
                sections[current] = []
                continue
            if re.match(r"%(changelog|package|description|prep|build|install|pre|post|preun|postun|posttrans)\b", line):
                current = None
        if current is not None and line.strip():
            sections[current].append(line.strip())
    return sections


def rpm_programs() -> dict[str, str]:
    out = {}
    for package, lines in spec_files_sections().items():
        for line in lines:
            match = re.fullmatch(r"%\{_s?bindir\}/([\w.-]+)", line)
            if match:
                out[match.group(1)] = package
    return out


def page_of(program: str) -> Path:
    pages = [REPO / "share" / "man" / f"{program}.{section}" for section in (1, 8)]
    found = [p for p in pages if p.exists()]
    assert found, f"{program} has no man page: write share/man/{program}.8 (or .1) and ship it in both packages"
    return found[0]


def test_both_recipes_install_the_same_programs_in_the_same_packages():
    assert deb_programs() == rpm_programs()
    assert {"ximd", "xim-router", "xerotier-engine-install"} <= set(deb_programs())


def test_every_installed_program_has_a_man_page_that_both_recipes_ship():
    spec = SPEC.read_text()
    files = spec_files_sections()
    for program, package in deb_programs().items():
        page = page_of(program)
        relative = page.relative_to(REPO).as_posix()
        section = page.suffix[1:]
        manpages = DEBIAN / f"{package}.manpages"
        assert manpages.exists() and relative in manpages.read_text().split(), f"{relative}: not in {manpages.name}"
        target = f"%{{_mandir}}/man{section}/{page.name}"
        assert f"install -Dpm 0644 {relative} %{{buildroot}}{target}\n" in spec, f"{relative}: the spec does not install it"
        gzip = re.search(r"^gzip -9n (.*?[^\\])$", spec, re.M | re.S)
        assert gzip and f"%{{buildroot}}{target}" in gzip.group(1).split(), f"{relative}: the spec does not compress it"
        assert f"{target}*" in files[package], f"{relative}: not in %files of {package}"


def page_options(page: str) -> set[str]:
    """The options the items of an OPTIONS section name in bold (\\fB\\-\\-flavor\\fR, \\fB\\-\\-flavor=\\fR...)."""
    section = re.search(r"^\.SH OPTIONS\n(.*?)^\.SH ", page, re.M | re.S)
    assert section, "no OPTIONS section"
    heads = re.findall(r"^\.TP\n(.*)$", section.group(1), re.M)
    return {m.replace("\\-", "-").rstrip("=") for head in heads for m in re.findall(r"\\fB((?:\\-)+[a-z][\w\\-]*=?)\\fR", head)}


def script_options() -> set[str]:
    """The options the installer's argument loop accepts (its case patterns)."""
    loop = re.search(r"^while \[ \$# -gt 0 \]; do\n(.*?)^done$", INSTALLER.read_text(), re.M | re.S)
    assert loop, "the installer's argument loop moved: update this test"
    patterns = re.findall(r"^\s+([^\s()]+)\)", loop.group(1), re.M)
    options = {p.removesuffix("=*") for pattern in patterns for p in pattern.split("|")} - {"*"}
    assert "--flavor" in options, options
    return options


def test_engine_install_page_names_every_option_the_script_accepts_and_no_other():
    assert page_options(INSTALLER_PAGE.read_text()) == script_options()


def test_engine_install_usage_names_only_options_the_script_accepts():
    done = subprocess.run(["sh", str(INSTALLER), "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("xerotier-engine-install: build the vLLM engine environment"), done.stdout
    (usage,) = [p for p in done.stdout.split("\n\n") if p.startswith("Usage: xerotier-engine-install ")]
    assert "set -eu" not in done.stdout
    assert set(re.findall(r"--[a-z][a-z-]*", usage)) <= script_options()


def test_engine_install_page_documents_every_flavour_and_the_default_prefix():
    script = INSTALLER.read_text()
    page = INSTALLER_PAGE.read_text()
    flavours = re.search(r'^case "\$flavor" in\n\s+([\w|]+)\) ;;', script, re.M)
    assert flavours, "the installer's flavour check moved: update this test"
    options = re.search(r"^\.SH OPTIONS\n(.*?)^\.SH ", page, re.M | re.S).group(1)
    for flavour in flavours.group(1).split("|"):
        assert f".TP\n\\fB{flavour}\\fR\n" in options, f"flavour {flavour} is not documented"
    # ximd's default engine.python is <the installer's default prefix>/bin/python, as both pages say.
    prefix = re.search(r"^flavor=\"\" prefix=(\S+) ", script, re.M)
    assert prefix and f"{prefix.group(1)}/bin/python" == configmod.SCHEMA["engine.python"].default
    assert f"(default\n\\fI{prefix.group(1)}\\fR" in page
    words = " ".join(page.split())
    for needed in ("systemctl restart ximd", "never from a package's maintainer scripts", ".xerotier\\-engine",
                   ".SH EXIT STATUS", "\\fBximd\\fR(8)", "\\fBagent.toml\\fR(5)"):
        assert needed in words, needed
