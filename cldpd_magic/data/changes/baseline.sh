# cldpd: the baseline of a run's changes, taken in the container before the agent starts.
# For each git repository (the workdir's, or those below it), its HEAD and the tree of its
# work tree; a workdir outside git is recorded in a repository of cldpd's own; without git,
# a copy of the workdir (when small) or a listing. Never fails the agent's start.
cldpd_baseline() {
  W=$(pwd)
  [ "$W" = / ] && return 0  # a workdir of / is the whole system: nothing to compare
  cldpd_state new || return 0
  T=$S
  printf '%s\n' "$W" >"$S/workdir"
  case $S in "$W"/*) printf '/%s/\n' "${S#"$W"/}" >"$S/exclude"; CLDPD_EXCLUDES=$S/exclude ;; esac
  if [ "$S" != /tmp/.cldpd-changes ] && [ "$HOME" = "$W" ]; then
    printf '/.claude/\n/.claude.json*\n/.cache/\n/.npm/\n' >>"$S/exclude"
    CLDPD_EXCLUDES=$S/exclude
  fi
  if command -v git >/dev/null 2>&1; then
    echo git >"$S/mode"
    n=0
    top=$(g rev-parse --show-toplevel 2>/dev/null)
    if [ -n "$top" ]; then
      cldpd_root "$top" repo $n
    else
      g init -q --bare "$S/shadow.git" >/dev/null 2>&1 || return 0
      (GIT_DIR=$S/shadow.git GIT_WORK_TREE=$W && export GIT_DIR GIT_WORK_TREE &&
        cldpd_root "$W" shadow $n)
    fi
    cldpd_nested >"$S/nested"
    while IFS= read -r repo; do
      n=$((n + 1))
      (cd "$repo" && cldpd_root "$repo" repo $n)
    done <"$S/nested"
    return 0
  fi
  size=$(du -sk . 2>/dev/null | cut -f1)
  if [ -n "$size" ] && [ "$size" -le 32768 ]; then
    echo copy >"$S/mode"
    mkdir -p "$S/base" && cp -a . "$S/base/" 2>/dev/null
    rm -rf "$S/base/${S#"$W"/}" 2>/dev/null
  else
    echo list >"$S/mode"
    cldpd_listing >"$S/listing"
  fi
}
cldpd_root() {  # dir kind index: record a repository's HEAD and work tree
  d=$S/roots/$3
  mkdir -p "$d" || return 0
  printf '%s\n' "$1" >"$d/dir"
  echo "$2" >"$d/kind"
  cldpd_prefix "$1" >"$d/prefix"
  g rev-parse -q --verify HEAD >"$d/head" 2>/dev/null
  if [ "$2" = shadow ]; then
    cldpd_tree "" "$d/index" >"$d/tree"
  else  # the snapshot's objects go to cldpd's own directory, never into the repository
    mkdir -p "$d/objects"
    GIT_OBJECT_DIRECTORY=$d/objects GIT_ALTERNATE_OBJECT_DIRECTORIES=$(cldpd_objects) \
      cldpd_tree "" "$d/index" >"$d/tree"
  fi
}
cldpd_listing() {  # size, modification time and path of every file and link
  find . \( -path "./${S#"$W"/}" -o -name .git \) -prune -o \( -type f -o -type l \) \
    -exec stat -c '%s %Y %n' {} + 2>/dev/null
}
