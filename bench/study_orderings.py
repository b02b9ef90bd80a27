"""The orderings issue 5 asks the study to test, read from a `fedrouter compare` directory.

For each claim "A >= B" it pairs the two methods' cells seed by seed (same seed = same clients and data)
and prints the mean difference, the smallest per-seed difference, the larger of the two methods' std
over seeds, and a verdict:
- "holds beyond seed noise": A beats B in every seed and by more than that std;
- "holds, within noise": A beats B on average but not clearly;
- "below, within noise": A is below B on average, not clearly;
- "below beyond seed noise": B beats A in every seed and by more than that std.

Usage: python bench/study_orderings.py runs/study
"""

import json
import statistics
import sys
from pathlib import Path

BASELINES = ["fedit", "local", "fedcluster", "fedsa", "feddpa", "hetlora", "flexlora", "fedex", "fedalt"]


def per_seed(runs: list[dict], method: str, scenario: str, key: str) -> dict[int, float]:
    return {r["seed"]: r[key] for r in runs if r["method"] == method and r["scenario"] == scenario}


def compare(runs, a: str, b: str, scenario: str, key: str = "rouge1") -> str:
    ra, rb = per_seed(runs, a, scenario, key), per_seed(runs, b, scenario, key)
    seeds = sorted(set(ra) & set(rb))
    if not seeds:
        return f"{a} >= {b} ({scenario}, {key}): no common seeds"
    diffs = [ra[s] - rb[s] for s in seeds]
    noise = max(statistics.pstdev([ra[s] for s in seeds]), statistics.pstdev([rb[s] for s in seeds]))
    mean = statistics.mean(diffs)
    if len(seeds) < 2:
        verdict = "holds (one seed: noise unknown)" if mean >= 0 else "does not hold (one seed)"
    elif min(diffs) > 0 and mean > noise:
        verdict = "holds beyond seed noise"
    elif mean >= 0:
        verdict = "holds, within noise"
    elif max(diffs) < 0 and -mean > noise:
        verdict = "below beyond seed noise"
    else:
        verdict = "below, within noise"
    return (f"{a} >= {b} ({scenario}, {key}): {verdict}: mean diff {mean:+.3f}, smallest {min(diffs):+.3f}, "
            f"std {noise:.3f}, seeds {seeds}")


def main():
    out = Path(sys.argv[1])
    runs = json.loads((out / "summary.json").read_text())["runs"]
    for scenario in ("single", "dual", "all"):
        for b in BASELINES:
            print(compare(runs, "fedrouter", b, scenario))
    for b in BASELINES:
        print(compare(runs, "fedrouter", b, "single", key="generalization"))


if __name__ == "__main__":
    main()
