# Background processes of a benchmark, recorded by phase in $WORK/pids.PHASE,
# so a phase can stop its own and the exit trap whatever is left. Sourced by
# run.sh and paths.sh (they set WORK first).

track() { echo "$2" >>"$WORK/pids.$1"; }

# stop_pids PHASE: TERM, up to 5 s to exit, then KILL.
stop_pids() {
    local file=$WORK/pids.$1 pid
    [[ -f $file ]] || return 0
    while read -r pid; do kill -TERM "$pid" 2>/dev/null || true; done <"$file"
    for _ in $(seq 50); do
        local alive=0
        while read -r pid; do kill -0 "$pid" 2>/dev/null && alive=1; done <"$file"
        [[ $alive == 0 ]] && break
        sleep 0.1
    done
    while read -r pid; do kill -KILL "$pid" 2>/dev/null || true; done <"$file"
    rm -f "$file"
}
