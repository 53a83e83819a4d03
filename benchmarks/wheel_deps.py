"""Check the carried wheels' own requirements (their ``Requires-Dist``) against the other carried wheels and
the packages this Python has, before an offline GPU machine finds out half-way through a run: the wheels go
in with ``pip install --no-deps``, so nothing else checks that, say, datasets' minimum pyarrow is there.

    python benchmarks/wheel_deps.py [WHEEL_DIR]        # default .whl

Prints one line (for gpu_check.sh's summary.md): every unmet requirement, as "datasets needs pyarrow>=21,
the image has 19.0.1", or that all are met. Exits 1 when one is unmet, 0 otherwise. A carried wheel wins over
an installed package of the same name (gpu_check.sh puts the wheels first on the path). Requirements only
for extras, or whose environment marker does not hold here, are skipped.
"""

from __future__ import annotations

import re
import sys
import zipfile
from importlib import metadata
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version
except ImportError:  # the GPU image has packaging; this keeps the check alive on a Python without it
    Requirement = None


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_metadata(path: Path) -> tuple[str, str, list[str]]:
    """A wheel's name, version and ``Requires-Dist`` lines, read from its ``*.dist-info/METADATA``."""
    with zipfile.ZipFile(path) as wheel:
        member = next(n for n in wheel.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        text = wheel.read(member).decode("utf-8", "replace")
    fields: dict[str, list[str]] = {}
    for line in text.split("\n\n", 1)[0].splitlines():  # the headers end at the first blank line
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), []).append(value.strip())
    return fields["Name"][0], fields["Version"][0], fields.get("Requires-Dist", [])


def _fallback_parse(line: str) -> tuple[str, list[tuple[str, str]]] | None:
    """Name and (operator, version) pairs of a requirement, without packaging: None where a marker is set
    (skipped: without packaging it cannot be evaluated)."""
    if ";" in line:
        return None
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*\(?([^)]*)\)?", line)
    specs = re.findall(r"(~=|==|!=|<=|>=|<|>)\s*([0-9][^,\s]*)", match.group(3)) if match else []
    return (match.group(1), specs) if match else None


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:4])


def _fallback_satisfied(version: str, specs: list[tuple[str, str]]) -> bool:
    have = _version_tuple(version)
    for op, want in specs:
        w = _version_tuple(want.rstrip(".*"))
        padded = have[: len(w)] if op in ("==", "!=", "~=") else have
        ok = {
            ">=": have >= w,
            ">": have > w,
            "<=": have <= w,
            "<": have < w,
            "==": padded == w,
            "!=": padded != w,
            "~=": have >= w and have[: len(w) - 1] == w[:-1],
        }[op]
        if not ok:
            return False
    return True


def unmet_requirements(wheel_dir: Path) -> tuple[int, list[str]]:
    """(how many wheels, one phrase per unmet requirement) for the ``*.whl`` in ``wheel_dir``."""
    wheels = {}
    for path in sorted(wheel_dir.glob("*.whl")):
        name, version, requires = wheel_metadata(path)
        wheels[canonical(name)] = (name, version, requires)
    unmet = []
    for name, _version, requires in wheels.values():
        for line in requires:
            if Requirement is not None:
                req = Requirement(line)
                if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                    continue
                wanted, specifier = req.name, req.specifier
            else:
                parsed = _fallback_parse(line)
                if parsed is None:
                    continue
                wanted, specifier = parsed
            key = canonical(wanted)
            if key in wheels:
                have, where = wheels[key][1], "the carried wheel is"
            else:
                try:
                    have, where = metadata.version(wanted), "the image has"
                except metadata.PackageNotFoundError:
                    unmet.append(f"{name} needs {line.split(';')[0].strip()}, which is neither carried nor installed")
                    continue
            if Requirement is not None:
                try:
                    ok = specifier.contains(Version(have), prereleases=True)
                except InvalidVersion:
                    ok = True  # a version string packaging cannot read: do not cry wolf
                spec = f"{wanted}{specifier}"
            else:
                ok = _fallback_satisfied(have, specifier)
                spec = f"{wanted}{','.join(op + v for op, v in specifier)}"
            if not ok:
                unmet.append(f"{name} needs {spec}, {where} {have}")
    return len(wheels), unmet


def main() -> None:
    wheel_dir = Path(sys.argv[1] if len(sys.argv) > 1 else ".whl")
    count, unmet = unmet_requirements(wheel_dir)
    if unmet:
        print(f"wheel requirements unmet ({len(unmet)}): " + "; ".join(unmet))
        sys.exit(1)
    print(f"wheel requirements: all met ({count} carried wheels, against each other and this Python's packages)")


if __name__ == "__main__":
    main()
