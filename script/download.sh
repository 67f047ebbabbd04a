#!/usr/bin/env bash
# Download, verify and lay out the inputs of the pipelines, where the scripts look by default.
#
#   bash script/download.sh voc12              # VOC 2012, SegmentationClassAug, saliency, weights
#   bash script/voc12_eps.sh                   # ... and the pipeline needs no path
#   bash script/download.sh coco               # COCO 2014, EPS masks, saliency, labels, weights
#   bash script/download.sh weights released   # init weights; the 4 released EPS checkpoints
#   bash script/download.sh --dry-run all      # every file: source, size, checksum, destination
#
# Options (python tools/download.py --help): --root DIR (default: the repository: datasets/ and
# weights/), --mirror URL or EPS_MIRROR=URL (every file fetched as URL/<file name>),
# --keep-archives, --coco-masks make, --retries, --timeout. The sources, sizes and checksums are
# one table: data/downloads.py. A rerun skips what is present and verified and resumes a partial
# download; <root>/{datasets,weights}/downloads.lock.json records the sha256 of what was fetched.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

exec "$PYTHON" "$REPO/tools/download.py" "$@"
