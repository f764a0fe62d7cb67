"""The glibc floor of libvgpu.so: it is preloaded into containers of any distribution, so
every versioned reference in its dynamic symbol table must be GLIBC_2.17 or older, and each
must name the library that defined the symbol in old glibc (dlopen in libdl.so.2, pthread_*
in libpthread.so.0), because an old ld.so fails a lookup that reaches the named file without
finding the symbol there. Read with a real ELF parser (pyelftools)."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerNeedSection, GNUVerSymSection
from elftools.elf.sections import SymbolTableSection

from .conftest import LIB, NATIVE

FLOOR = (2, 17)
_GLIBC = re.compile(r"GLIBC_(\d+(?:\.\d+)+)")


@dataclass(frozen=True)
class Ref:
    symbol: str  # "" for a version needed without a symbol of it in .dynsym
    version: str
    file: str


def glibc_refs(path: Path) -> list[Ref]:
    """Every GLIBC_* reference of a shared object: the versioned undefined symbols and the
    version needs (.gnu.version_r) themselves, each with the file the need names."""
    with path.open("rb") as f:
        elf = ELFFile(f)
        needs: dict[int, tuple[str, str]] = {}
        verneed = elf.get_section_by_name(".gnu.version_r")
        if isinstance(verneed, GNUVerNeedSection):
            for need, auxes in verneed.iter_versions():
                for aux in auxes:
                    needs[aux["vna_other"]] = (aux.name, need.name or "")
        refs = [Ref("", v, file) for v, file in needs.values()]
        dynsym = elf.get_section_by_name(".dynsym")
        versym = elf.get_section_by_name(".gnu.version")
        if not isinstance(dynsym, SymbolTableSection) or not isinstance(versym, GNUVerSymSection):
            return refs
        for i, sym in enumerate(dynsym.iter_symbols()):
            if sym["st_shndx"] != "SHN_UNDEF" or not sym.name:
                continue
            ndx = versym.get_symbol(i)["ndx"]
            if isinstance(ndx, int) and ndx in needs:
                version, file = needs[ndx]
                refs.append(Ref(sym.name, version, file))
    return [r for r in refs if r.version.startswith("GLIBC_")]


def too_new(ref: Ref) -> bool:
    """Above the floor, or a GLIBC_ version that is no release number at all
    (GLIBC_PRIVATE, GLIBC_ABI_DT_RELR from -z pack-relative-relocs): 2.17 has neither."""
    m = _GLIBC.fullmatch(ref.version)
    if m is None:
        return True
    return tuple(int(p) for p in m.group(1).split(".")) > FLOOR


def wrong_file(ref: Ref) -> bool:
    """Whether a symbol is required from another file than the one that defined it before
    glibc 2.34 merged libdl and libpthread into libc.so.6."""
    if re.fullmatch(r"dl(open|close|sym|vsym|error|addr|addr1|info|mopen)", ref.symbol):
        return ref.file != "libdl.so.2"
    if ref.symbol.startswith("pthread_"):
        return ref.file != "libpthread.so.0"
    return False


def violations(path: Path) -> list[str]:
    return sorted(
        f"{r.symbol or '(need)'}@{r.version} from {r.file}"
        for r in glibc_refs(path)
        if too_new(r) or wrong_file(r)
    )


def host_build(tmp_path: Path, source: str, *flags: str) -> Path:
    """A shared object built the ordinary way, on this machine's glibc."""
    src = tmp_path / "probe.c"
    src.write_text(source)
    out = tmp_path / "probe.so"
    subprocess.run(
        ["gcc", "-O2", "-fPIC", "-shared", *flags, "-o", str(out), str(src)],
        check=True,
        timeout=120,
    )
    return out


def test_libvgpu_needs_nothing_newer_than_glibc_2_17() -> None:
    refs = glibc_refs(LIB)
    assert refs, "no GLIBC_ references read at all"
    bad = violations(LIB)
    assert not bad, "libvgpu.so needs a newer glibc than 2.17: " + ", ".join(bad)


def test_libvgpu_requires_dl_and_pthread_from_their_old_libraries() -> None:
    by_symbol = {r.symbol: r for r in glibc_refs(LIB) if r.symbol}
    # The limiter does use these; if it stops, this test says so instead of passing vacuously.
    assert by_symbol["dlopen"].file == "libdl.so.2"
    assert by_symbol["dlvsym"].file == "libdl.so.2"
    assert by_symbol["pthread_create"].file == "libpthread.so.0"
    with LIB.open("rb") as f:
        dynamic = ELFFile(f).get_section_by_name(".dynamic")
        assert isinstance(dynamic, DynamicSection)
        needed = {str(t.needed) for t in dynamic.iter_tags("DT_NEEDED")}  # type: ignore[attr-defined]
    assert {"libc.so.6", "libdl.so.2", "libpthread.so.0"} <= needed


def test_check_rejects_the_ordinary_host_build(tmp_path: Path) -> None:
    """The same source linked the usual way against this machine's glibc (2.34+) is the
    build the floor exists to prevent: the check must name its new references."""
    src = (NATIVE / "src" / "vgpu.c").read_text()
    probe = tmp_path / "src"
    shutil.copytree(NATIVE / "src", probe)
    lib = host_build(
        probe, src, "-std=c11", "-fvisibility=hidden", f"-I{probe}", "-ldl", "-lpthread"
    )
    bad = violations(lib)
    if not any("GLIBC_2.34" in b for b in bad):
        pytest.skip("this machine's glibc predates 2.34; nothing new to catch")
    assert any(b.startswith("dlopen@GLIBC_2.34") for b in bad), bad
    assert any(b.startswith("pthread_create@GLIBC_2.34") for b in bad), bad


def test_check_catches_implicit_and_data_references(tmp_path: Path) -> None:
    """References the source never spells: a data symbol the toolchain's own headers and
    runtimes use, and the 2.33 fstat that current headers emit instead of __fxstat."""
    lib = host_build(
        tmp_path,
        "#include <sys/stat.h>\n"
        "extern char __libc_single_threaded;\n"
        "int probe(int fd) { struct stat st; return __libc_single_threaded + fstat(fd, &st); }\n",
    )
    bad = violations(lib)
    assert "__libc_single_threaded@GLIBC_2.32 from libc.so.6" in bad
    assert "fstat@GLIBC_2.33 from libc.so.6" in bad


def test_symbol_missing_from_the_list_fails_the_build(tmp_path: Path) -> None:
    """-z defs against the stubs: a call nobody listed (with its 2.17 version) in
    glibc/<arch>.syms is a link error, not a silently newer reference."""
    arch = subprocess.run(["gcc", "-dumpmachine"], capture_output=True, text=True, check=True)
    listed = NATIVE / "glibc" / f"{arch.stdout.split('-')[0]}.syms"
    trimmed = tmp_path / "trimmed.syms"
    trimmed.write_text(
        "".join(
            re.sub(r"\s+dlopen(?=\s|$)", "", line) if line.startswith("libdl.so.2") else line
            for line in listed.read_text().splitlines(keepends=True)
        )
    )
    build = tmp_path / "build"
    p = subprocess.run(
        [
            "make",
            "-s",
            "-C",
            str(NATIVE),
            f"B={build}",
            f"SYMS={trimmed}",
            str(build / "libvgpu.so"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert p.returncode != 0
    assert "dlopen" in p.stderr, p.stderr
