#!/usr/bin/env bash
# How docs/demo_matrix_previous_defaults/ (gap groups, no calibration: every row, every setting, 3 seeds) was made (2026-12-01, 2 CPU cores, one
# thread per process). Each `invdiff demo` call caches its (setting, seed, row) cells, so the
# calls below can run in any order or in parallel on different OUT folders; the last steps only
# gather the cells and write the reports (`--cached-only` runs nothing).
set -euo pipefail
export OMP_NUM_THREADS=1
D=invdiff
# The design setting, 3 seeds, the main rows.
$D demo --out matrix_out --settings colors2_p0.9 --rows base erm oracle invdiff --seeds 0 1 2
# The held-out settings, 3 seeds: base and InvDiff; the oracle on the non-colour setting.
$D demo --out matrix_out_b --settings colors2_p0.8 colors3_p0.9 thickness_p0.9 --rows base invdiff --seeds 0 1 2
$D demo --out matrix_out_b --settings thickness_p0.9 --rows oracle base invdiff --seeds 2 1 0
# ERM and the oracle on the held-out settings, one seed at a time (the oracle in its own folder,
# so that both run at once; its cells are gathered below).
for s in 0 1 2; do
  $D demo --out matrix_out_b --settings colors2_p0.8 colors3_p0.9 thickness_p0.9 --rows erm base invdiff --seeds $s
done
mkdir -p matrix_out_f/cells && cp -n matrix_out_b/cells/colors2_p0.8* matrix_out_b/cells/colors3_p0.9* matrix_out_f/cells/
for s in 0 1 2; do
  $D demo --out matrix_out_f --settings colors2_p0.8 colors3_p0.9 --rows oracle base invdiff --seeds $s
done
# The baselines, design setting, seed 0.
$D demo --out matrix_out --settings colors2_p0.9 --rows official jtt groupdro balanced base invdiff --seeds 0
# The baselines on the other seeds and the held-out settings (2026-12-01, a second session; the
# official and balanced rows in matrix_out, GroupDRO and JTT in matrix_out_g beside them, the last
# seed from both ends so that two processes shared it).
cp -n matrix_out_b/cells/* matrix_out_f/cells/* matrix_out/cells/
H="colors2_p0.8 colors3_p0.9 thickness_p0.9"
$D demo --out matrix_out --settings colors2_p0.9 --rows official jtt groupdro balanced base invdiff --seeds 1 2
$D demo --out matrix_out --settings $H --rows balanced base invdiff --seeds 0 1 2
$D demo --out matrix_out --settings $H --rows official base invdiff --seeds 0 1 2
mkdir -p matrix_out_g/cells && cp -n matrix_out/cells/colors2_p0.8_* matrix_out/cells/colors3_p0.9_* \
    matrix_out/cells/thickness_p0.9_* matrix_out_g/cells/
for s in 0 1 2; do
  $D demo --out matrix_out_g --settings thickness_p0.9 colors3_p0.9 colors2_p0.8 --rows groupdro jtt base invdiff --seeds $s
done
# Gather and report: every row, every setting, 3 seeds.
cp -n matrix_out_g/cells/* matrix_out/cells/
$D demo --out matrix_out --cached-only --seeds 0 1 2 \
    --settings colors2_p0.9 colors2_p0.8 colors3_p0.9 thickness_p0.9 \
    --rows base erm oracle invdiff official jtt groupdro balanced
mkdir -p docs/demo_matrix_previous_defaults && cp matrix_out/report.* matrix_out/*.png docs/demo_matrix_previous_defaults/
