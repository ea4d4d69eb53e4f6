"""Stand-in of A1111's ``launch`` module for install.py: ``run_pip`` as launch_utils.run_pip runs pip.

Each call is also appended to the file named by $FAKE_LAUNCH_LOG, so a test can see install.py used it.
"""

import os
import subprocess
import sys

python = sys.executable


def run_pip(command, desc=None, live=False):
    if os.environ.get("FAKE_LAUNCH_LOG"):
        with open(os.environ["FAKE_LAUNCH_LOG"], "a", encoding="utf-8") as fh:
            fh.write(f"{desc}\n")
    print(f"Installing {desc}")
    subprocess.run(f'"{python}" -m pip {command} --prefer-binary', shell=True, check=True)
