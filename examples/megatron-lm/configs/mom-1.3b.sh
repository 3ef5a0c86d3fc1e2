# MoM 1.3B, the paper's larger model; the shared definition and its sources are in paper.sh.
source "$(dirname "${BASH_SOURCE[0]}")/paper.sh"
paper_model 1.3b mom
