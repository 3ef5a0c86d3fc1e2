# Hybrid MoM/attention 1.3B (one attention layer after every 7 MoM layers); the shared definition and its sources are in paper.sh.
source "$(dirname "${BASH_SOURCE[0]}")/paper.sh"
paper_model 1.3b hybrid
