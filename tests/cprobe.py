"""What the C compiler sees in kernel headers: numbers, struct sizes and
field offsets, from a probe compiled and run once (tests/test_kvm_uapi.py
and tests/test_vhost_uapi.py compare pyvmm's ctypes copies with them)."""

import shutil
import subprocess

import pytest


def c_values(directory, headers, numbers=(), structs=(), offsets=(), signed=True):
    """{name: value} for each of numbers ("NAME"), structs ("sizeof NAME") and
    offsets (struct, field: "offsetof struct.field"), as the C compiler sees
    them after including headers; the probe is built in directory."""
    if not shutil.which("gcc"):
        pytest.fail("gcc is needed (scripts/setup installs it)")
    kind, form = ("long", "%ld") if signed else ("unsigned long", "%lu")
    lines = ["#include <stdio.h>", "#include <stddef.h>",
             *(f"#include <{h}>" for h in headers), "int main(void) {"]
    for name in numbers:
        lines.append(f'printf("{name} {form}\\n", ({kind})({name}));')
    for name in structs:
        lines.append(f'printf("sizeof {name} %zu\\n", sizeof(struct {name}));')
    for struct, field in offsets:
        lines.append(f'printf("offsetof {struct}.{field} %zu\\n", '
                     f'offsetof(struct {struct}, {field}));')
    lines.append("return 0; }")
    (directory / "probe.c").write_text("\n".join(lines))
    subprocess.run(["gcc", "-o", str(directory / "probe"), str(directory / "probe.c")],
                   check=True)
    out = subprocess.run([str(directory / "probe")], capture_output=True, text=True,
                         check=True).stdout
    return {line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1]) for line in out.splitlines()}
