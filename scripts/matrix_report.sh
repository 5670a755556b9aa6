#!/usr/bin/env bash
# How docs/demo_matrix/ was made at the issue-21 defaults (otsu groups, the calibrated push):
# six settings, 3 seeds, every row (2026-12-03, 2 CPU cores, about 2 hours of wall time for the
# ERM and oracle cells, much of it shared with other work; the baselines' times are below). Each `invdiff demo` call caches its (setting, seed, row) cells under OUT/cells, so the
# calls below can stop and resume; the last step only gathers the cells and writes the report
# (`--cached-only` runs nothing, and lists any cell that was never run).
#
# The base and InvDiff cells were made first, by the development runs of docs/dev_runs sections
# 8d and 9 (the same commands as the first line below, in three folders at the same commit, whose
# cells were copied into one OUT: a cell's name carries the hash of every setting it depends on,
# and all of them matched). The other rows ran in that OUT.
set -euo pipefail
export OMP_NUM_THREADS=2
D=invdiff
OUT=${1:-matrix_out}
ALL="colors2_p0.9 colors2_p0.8 colors3_p0.9 thickness_p0.9 position_p0.9 size_p0.9"
# base and invdiff are in every call: the targets compare them (their cells are reused).
$D demo --out "$OUT" --settings $ALL --rows base invdiff --seeds 0 1 2
$D demo --out "$OUT" --settings $ALL --rows base invdiff erm oracle --seeds 0 1 2
# The official recipe and the balanced-data bases on every setting (2026-12-03, a second session,
# about 90 minutes of wall time, shared with other work and paused for the serve soak benchmark):
$D demo --out "$OUT" --settings $ALL --rows base invdiff balanced official --seeds 0 1 2
# JTT and GroupDRO on the two settings that had no baseline rows at all (about 25 minutes), then
# on thickness (10 minutes):
$D demo --out "$OUT" --settings position_p0.9 size_p0.9 --rows base invdiff jtt groupdro --seeds 0 1 2
$D demo --out "$OUT" --settings thickness_p0.9 --rows base invdiff jtt groupdro --seeds 0 1 2
# JTT and GroupDRO on the colour settings (2026-12-03, a third session, about 45 minutes of wall
# time shared with other work; 4 cells at 2 threads, then 14 at OMP_NUM_THREADS=1):
$D demo --out "$OUT" --settings colors2_p0.9 colors2_p0.8 colors3_p0.9 --rows base invdiff jtt groupdro --seeds 0 1 2
# Gather and report: a row is reported for a setting only where all 3 seeds have its cells.
# (printed.txt goes beside the report, not into OUT: demo refuses an OUT that holds files it did not make.)
mkdir -p docs/demo_matrix
$D demo --out "$OUT" --cached-only --seeds 0 1 2 --settings $ALL --rows base erm oracle invdiff official jtt groupdro balanced > docs/demo_matrix/printed.txt
cp "$OUT"/report.* "$OUT"/*.png docs/demo_matrix/
python scripts/matrix_tables.py docs/demo_matrix/report.json > docs/demo_matrix/tables.md
