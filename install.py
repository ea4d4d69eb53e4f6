"""WebUI install hook (A1111 and Forge run it with the WebUI's python at every start): install only what the
trainer needs and the environment lacks, and never change the version of anything already installed.

Every installed distribution is pinned to its installed version in a constraints file, so pip may add a
missing package (and missing dependencies of it) but cannot upgrade or downgrade the WebUI's own pins
(torch, pillow 9.5, safetensors 0.4.2, ...). A requirement that is installed in a version outside its range
is reported, not changed. Uses ``launch.run_pip`` inside the WebUI (which honours --skip-install), plain
``python -m pip`` otherwise. ``python install.py [REQUIREMENTS_FILE]`` checks another list (tests do).
"""

import importlib
import os
import re
import subprocess
import sys
import tempfile
from importlib import metadata

# The engine inside the WebUI (requirements/engine.txt); open_clip_torch for captioning ships with A1111/Forge.
REQUIREMENTS = ["lycoris-lora>=3.0", "safetensors>=0.4.2", "pillow>=9.5", "pyyaml", "tqdm"]
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path):
    with open(path, encoding="utf-8") as fh:
        lines = [line.split("#", 1)[0].strip() for line in fh]
    return [line for line in lines if line and not line.startswith("-")]


def installed_versions():
    """{canonical name: version} of every distribution this python sees."""
    versions = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and canonical(name) not in versions:
            versions[canonical(name)] = dist.version
    return versions


def satisfies(requirement, version):
    """Whether ``version`` meets the requirement's specifier (True when it cannot be checked)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        try:
            from pip._vendor.packaging.requirements import Requirement  # every venv with pip has this one
        except ImportError:
            return True
    return Requirement(requirement).specifier.contains(version, prereleases=True)


def write_constraints(versions):
    handle, path = tempfile.mkstemp(prefix="lora_trainer_constraints_", suffix=".txt")
    with os.fdopen(handle, "w", encoding="utf-8") as fh:
        for name, version in sorted(versions.items()):
            fh.write(f"{name}=={version}\n")
    return path


def run_pip(args, desc):
    try:
        import launch
    except ImportError:
        launch = None
    if launch is not None and hasattr(launch, "run_pip"):
        launch.run_pip(args, desc)  # the WebUI's own runner: its index URL, --prefer-binary, --skip-install
        return
    print(f"Installing {desc}", flush=True)
    subprocess.run(f'"{sys.executable}" -m pip {args} --prefer-binary --disable-pip-version-check', shell=True,
                   check=True)


def main(requirements):
    versions = installed_versions()
    missing = []
    for requirement in requirements:
        match = _NAME.match(requirement)
        if not match:
            continue
        name = canonical(match.group(1))
        if name not in versions:
            missing.append(requirement)
        elif not satisfies(requirement, versions[name]):
            print(f"lora_trainer: {name} {versions[name]} is installed, {requirement} is wanted; left as it is "
                  "(the WebUI pins it)", flush=True)
    if not missing:
        print("lora_trainer: all requirements are installed; nothing to do")
        return 0
    constraints = write_constraints(versions)
    try:
        quoted = " ".join(f'"{r}"' for r in missing)
        run_pip(f'install -c "{constraints}" {quoted}', f"LoRA trainer requirements: {', '.join(missing)}")
    except Exception as exc:  # noqa: BLE001 - launch.run_pip raises RuntimeError, subprocess CalledProcessError
        print(f"lora_trainer: could not install {', '.join(missing)} without changing installed packages ({exc}); "
              "install them by hand", file=sys.stderr)
        return 1
    finally:
        os.unlink(constraints)
    importlib.invalidate_caches()
    added = sorted(set(installed_versions()) - set(versions))
    print(f"lora_trainer: installed {', '.join(added) or 'nothing new'}; no installed package was changed")
    return 0


if __name__ == "__main__":
    sys.exit(main(read_requirements(sys.argv[1]) if len(sys.argv) > 1 else REQUIREMENTS))
