"""Mutation score of one engine module against its own test file; one JSON line.

    pip install mutmut==3.8.1
    python bench/mutation.py losses

mutmut changes the module one small edit at a time (a constant, an operator, a call argument, a returned
value ...) and runs the module's own tests against each changed copy: a *killed* mutant made a test fail, a
*survivor* passed every test, so either the tests miss that behaviour or the edit changes nothing a user can
observe (an equivalent mutant). The run happens in a scratch copy (``.mutation/<module>/``, ignored by git):
the package, ``devtools/`` (tiny model configs) and the one test file, so the working tree is never touched
and other test files do not slow the run. ``mutmut results`` and ``mutmut show <name>`` work inside that
folder afterwards. On two busy cores tokens, segment and concepts take 10 to 35 minutes; losses, localization
and learn take hours (their tests train and run models), so ``--only`` runs some functions at a time.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from importlib.metadata import version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Module of ice_ops -> its own test file.
MODULES = {
    "losses": "tests/test_losses.py",
    "segment": "tests/test_segment.py",
    "localization": "tests/test_localize.py",
    "learn": "tests/test_learn.py",
    "tokens": "tests/test_tokens.py",
    "concepts": "tests/test_concepts.py",
}
COPIED = ("ice_ops", "devtools", "pyproject.toml", "tests/conftest.py")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.orig")
KILLED = ("killed", "timeout", "caught by type check")
NOT_TESTED = "not checked"  # outside --only


def prepare(module: str, work: str) -> None:
    """A fresh scratch copy in ``work`` with a setup.cfg that mutates only ``module``."""
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.join(work, "tests"))
    for path in COPIED + (MODULES[module],):
        source, target = os.path.join(ROOT, path), os.path.join(work, path)
        if os.path.isdir(source):
            shutil.copytree(source, target, ignore=IGNORED)
        else:
            shutil.copy2(source, target)
    settings = {
        "source_paths": "ice_ops",
        "only_mutate": f"ice_ops/{module}.py",
        "also_copy": "devtools",
        "pytest_add_cli_args_test_selection": MODULES[module],
        "process_isolation": "forkserver",  # torch is not fork-safe once it has run
        "use_git_change_detection": "false",
    }
    with open(os.path.join(work, "setup.cfg"), "w", encoding="utf-8") as handle:
        handle.write("[mutmut]\n" + "".join(f"{key} = {value}\n" for key, value in settings.items()))


def statuses(work: str) -> dict[str, str]:
    """``{mutant name: status}`` of every mutant, read from ``mutmut results``."""
    listing = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work,
                             capture_output=True, text=True, check=True).stdout
    found = {}
    for line in listing.splitlines():
        name, separator, status = line.strip().rpartition(": ")
        if separator and name.startswith("ice_ops."):
            found[name] = status
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("module", choices=sorted(MODULES))
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 1,
                        help="mutants tested at once (default: one per CPU)")
    parser.add_argument("--work", default=None, help="scratch folder (default .mutation/<module>)")
    parser.add_argument("--again", action="store_true",
                        help="keep the scratch copy of the last run, bring the test file up to date and test only "
                             "that run's survivors again (after adding tests)")
    parser.add_argument("--only", action="append", default=[], metavar="GLOB",
                        help="test only the mutants whose names match (repeatable), e.g. 'ice_ops.learn.x_train*'; "
                             "the score then counts the mutants tested")
    args = parser.parse_args()
    work = os.path.abspath(args.work or os.path.join(ROOT, ".mutation", args.module))

    start = time.time()
    command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children)]
    if args.again:
        if not os.path.isdir(os.path.join(work, "mutants")):
            sys.exit(f"No earlier run in {work}; run without --again first.")
        for path in ("tests/conftest.py", MODULES[args.module]):
            shutil.copy2(os.path.join(ROOT, path), os.path.join(work, path))
        command += sorted(name for name, status in statuses(work).items() if status not in KILLED + (NOT_TESTED,))
    else:
        prepare(args.module, work)
        command += args.only
    with open(os.path.join(work, "mutmut.log"), "a" if args.again else "w", encoding="utf-8") as log:
        subprocess.run(command, cwd=work, stdout=log, stderr=subprocess.STDOUT, check=True)
    found = statuses(work)
    counts: dict[str, int] = {}
    for status in found.values():
        counts[status] = counts.get(status, 0) + 1
    tested = len(found) - counts.get(NOT_TESTED, 0)
    killed = sum(counts.get(status, 0) for status in KILLED)
    line = {
        "bench": "mutation",
        "module": f"ice_ops/{args.module}.py",
        "tests": MODULES[args.module],
        "mutmut": version("mutmut"),
        "mutants": len(found),
        "tested": tested,
        "killed": killed,
        "score": round(killed / tested, 3) if tested else None,
        "statuses": counts,
        "survivors": sorted(name for name, status in found.items() if status not in KILLED + (NOT_TESTED,)),
        "seconds": round(time.time() - start),
        "work": work,
    }
    sys.stdout.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
