# Sourced by the recipes (scripts/train_*.sh): `stage NAME COMMAND...` runs COMMAND when the comma-separated
# $stages lists NAME (every stage when $stages is unset) and appends its wall time to $run/timings.txt.
stage() {
  local name=$1 started=$SECONDS
  shift
  [[ -z "${stages:-}" || ",$stages," == *",$name,"* ]] || return 0
  "$@"
  echo "$name $((SECONDS - started)) s" | tee -a "$run/timings.txt"
}
