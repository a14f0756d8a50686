# cldpd: what the baseline and the capture of a run's changes share (plain POSIX sh).
# State lives under $HOME/.cache/cldpd/changes (it survives the container's stop and a
# snapshot of it), else under /tmp; never in the user's refs, index or work tree.
cldpd_state() {
  for cldpd_s in "${HOME:-/nonexistent}/.cache/cldpd/changes" /tmp/.cldpd-changes; do
    case $1 in
      new) rm -rf "$cldpd_s" 2>/dev/null
           mkdir -p "$cldpd_s" 2>/dev/null && [ -w "$cldpd_s" ] && S=$cldpd_s && return 0 ;;
      *) [ -f "$cldpd_s/workdir" ] && S=$cldpd_s && return 0 ;;
    esac
  done
  return 1
}
# git that reads no repository's own settings that change what it prints or runs.
g() {
  git -c safe.directory='*' -c core.fsmonitor=false -c core.quotepath=true -c gc.auto=0 \
    -c advice.addEmbeddedRepo=false -c advice.detachedHead=false -c diff.noprefix=false \
    -c diff.mnemonicPrefix=false -c diff.relative=false -c diff.external= -c color.ui=false \
    -c core.checkStat=minimal -c core.splitIndex=false -c index.sparse=false \
    ${CLDPD_EXCLUDES:+-c core.excludesFile="$CLDPD_EXCLUDES"} "$@"
}
# The tree of the work tree (tracked and untracked, ignored files left out), written
# through a throwaway index ($T) into the object directory the caller names: the
# repository's own index and objects are only read. $1: an index to start from (its
# file times spare hashing unchanged files); $2: where to keep the index made.
cldpd_tree() {
  cldpd_idx="$T/index.$$"
  rm -f "$cldpd_idx"
  cldpd_real=$1
  [ -n "$cldpd_real" ] || cldpd_real=$(g rev-parse --git-path index 2>/dev/null)
  [ -n "$cldpd_real" ] && [ -f "$cldpd_real" ] && cp "$cldpd_real" "$cldpd_idx" 2>/dev/null
  GIT_INDEX_FILE=$cldpd_idx g add -A --ignore-errors >/dev/null 2>&1
  if ! GIT_INDEX_FILE=$cldpd_idx g write-tree 2>/dev/null; then
    rm -f "$cldpd_idx"  # an index with conflicts: start from an empty one
    GIT_INDEX_FILE=$cldpd_idx g add -A --ignore-errors >/dev/null 2>&1
    GIT_INDEX_FILE=$cldpd_idx g write-tree 2>/dev/null
  fi
  [ -n "$2" ] && cp "$cldpd_idx" "$2" 2>/dev/null
  rm -f "$cldpd_idx" "$cldpd_idx.lock"
}
# A repository's object directory, as an absolute path.
cldpd_objects() {
  cldpd_o=$(g rev-parse --git-path objects 2>/dev/null) && (cd "$cldpd_o" 2>/dev/null && pwd)
}
# Repositories below the workdir (a clone, a submodule), a few levels down.
cldpd_nested() {
  find "$W" -mindepth 2 -maxdepth 4 \( -path "$W/.git" -o -path "$S" -o -name node_modules \) \
    -prune -o -name .git -print -prune 2>/dev/null | sed 's,/\.git$,,'
}
# A path under the workdir as a patch prefix ("" for the workdir itself, else "sub/").
cldpd_prefix() {
  case $1 in
    "$W") echo "" ;;
    "$W"/*) echo "${1#"$W"/}/" ;;
    *) echo "" ;;
  esac
}
