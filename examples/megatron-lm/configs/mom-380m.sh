# MoM 380M, the paper's smaller model; the shared definition and its sources are in paper.sh.
source "$(dirname "${BASH_SOURCE[0]}")/paper.sh"
paper_model 380m mom
