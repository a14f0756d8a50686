# cldpd: the capture of a run's changes since its baseline (baseline.sh), as one payload
# on stdout: base64 (hex through od when there is no base64) between two marker lines.
# The payload is lines "#cldpd <what> [arg]" each followed by its content: notes, the
# commits made during the run, then a binary-safe patch (git diff --binary of each
# repository's work tree against its baseline, new untracked files included); over the
# size cap, the list of changed files with their sizes instead. It writes nothing in the
# workdir, its repositories or the baseline (its own objects go to a temporary directory).
cldpd_capture() {
  max=$1
  T=$(mktemp -d 2>/dev/null || echo "/tmp/.cldpd-capture.$$")
  mkdir -p "$T" || return 1
  P=$T/payload
  : >"$P"
  if ! cldpd_state find; then
    echo "#cldpd v1 none" >>"$P"
    echo "#cldpd note the run kept no baseline, so its changes are not known" >>"$P"
    cldpd_emit; return 0
  fi
  W=$(cat "$S/workdir")
  [ -f "$S/exclude" ] && CLDPD_EXCLUDES=$S/exclude
  mode=$(cat "$S/mode" 2>/dev/null)
  if ! cd "$W" 2>/dev/null; then
    echo "#cldpd v1 none" >>"$P"
    echo "#cldpd note the workdir $W is gone" >>"$P"
    cldpd_emit; return 0
  fi
  if [ "$mode" = git ] && command -v git >/dev/null 2>&1; then
    cldpd_git_roots
    for d in "$S"/roots/* "$T"/roots/*; do
      [ -f "$d/dir" ] && cldpd_git_root "$d" patch >>"$T/patch"
    done
  else
    cldpd_files patch >"$T/patch"
  fi
  size=$(wc -c <"$T/patch")
  if [ "$size" -le "$max" ]; then
    echo "#cldpd v1 ok" >>"$P"
    cat "$T/commits" 2>/dev/null >>"$P"
    echo "#cldpd patch" >>"$P"
    cat "$T/patch" >>"$P"
  else
    rm -f "$T/patch"
    echo "#cldpd v1 truncated $size $max" >>"$P"
    cat "$T/commits" 2>/dev/null >>"$P"
    if [ "$mode" = git ]; then
      for d in "$S"/roots/* "$T"/roots/*; do
        [ -f "$d/dir" ] && cldpd_git_root "$d" list >>"$P"
      done
    else
      echo "#cldpd files" >>"$P"
      cldpd_files list >>"$P"
    fi
  fi
  cldpd_emit
}
cldpd_emit() {
  echo "cldpd-changes begin"
  if command -v base64 >/dev/null 2>&1; then
    echo "cldpd-changes base64"
    base64 <"$P"
  else
    echo "cldpd-changes hex"
    od -An -v -tx1 <"$P"
  fi
  echo "cldpd-changes end"
  rm -rf "$T"
}
cldpd_git_roots() {  # repositories that appeared during the run get roots of their own
  n=0
  cldpd_nested | while IFS= read -r repo; do
    grep -qxF "$repo" "$S/nested" 2>/dev/null && continue
    n=$((n + 1))
    d=$T/roots/new$n
    mkdir -p "$d"
    printf '%s\n' "$repo" >"$d/dir"
    echo new >"$d/kind"
    cldpd_prefix "$repo" >"$d/prefix"
  done
}
cldpd_git_root() {  # root-dir patch|list: one repository's commits and changes
  dir=$(cat "$1/dir"); kind=$(cat "$1/kind"); prefix=$(cat "$1/prefix"); what=$2
  (
    cd "$dir" 2>/dev/null || exit 0
    mkdir -p "$T/objects"
    if [ "$kind" = shadow ]; then
      GIT_DIR=$S/shadow.git GIT_WORK_TREE=$W
      export GIT_DIR GIT_WORK_TREE
      GIT_ALTERNATE_OBJECT_DIRECTORIES=$S/shadow.git/objects
    else
      GIT_ALTERNATE_OBJECT_DIRECTORIES=$(cldpd_objects)
      [ -d "$1/objects" ] && GIT_ALTERNATE_OBJECT_DIRECTORIES=$GIT_ALTERNATE_OBJECT_DIRECTORIES:$1/objects
    fi
    GIT_OBJECT_DIRECTORY=$T/objects
    export GIT_OBJECT_DIRECTORY GIT_ALTERNATE_OBJECT_DIRECTORIES
    head=$(g rev-parse -q --verify HEAD 2>/dev/null)
    base_head=$(cat "$1/head" 2>/dev/null)
    base=$(cat "$1/tree" 2>/dev/null)
    if [ "$kind" = new ]; then  # cloned or made during the run: what no remote has
      first=$(g rev-list --reverse HEAD --not --remotes 2>/dev/null | head -n 1)
      if [ -n "$first" ]; then
        base_head=$(g rev-parse -q --verify "$first^" 2>/dev/null)
      else
        base_head=$head
      fi
      [ -n "$base_head" ] && base=$(g rev-parse -q --verify "$base_head^{tree}")
    fi
    [ -n "$base" ] || base=$(g hash-object -t tree /dev/null)
    start=""
    [ -f "$1/index" ] && start=$1/index
    end=$(cldpd_tree "$start" "")
    [ -n "$end" ] || exit 0
    fmt=$(printf '%s' "$prefix" | sed 's/%/%%/g')
    [ "$what" = patch ] && [ -n "$base_head" ] && printf '#cldpd base %s\t%s\n' "$prefix" \
      "$base_head" >>"$T/commits"
    if [ "$what" = patch ] && [ -n "$head" ] && [ "$head" != "$base_head" ]; then
      range=$head
      [ -n "$base_head" ] && range="$base_head..$head"
      g log --no-color -n 1000 --format="#cldpd commit $fmt	%H %s" $range \
        >>"$T/commits" 2>/dev/null
    fi
    set -- --no-color --no-ext-diff --no-textconv --ignore-submodules=all -O/dev/null \
      --src-prefix="a/$prefix" --dst-prefix="b/$prefix"
    if [ "$what" = patch ]; then
      g diff --binary --full-index -M -U3 "$@" "$base" "$end"
    else
      echo "#cldpd raw $prefix"
      g diff --raw --abbrev=40 --no-renames "$@" "$base" "$end"
      echo "#cldpd numstat $prefix"
      g diff --numstat --no-renames "$@" "$base" "$end"
      echo "#cldpd sizes $prefix"
      g diff --raw --abbrev=40 --no-renames "$@" "$base" "$end" |
        cut -d' ' -f3,4 | tr ' ' '\n' | grep -v '^0*$' | g cat-file --batch-check
    fi
  )
}
cldpd_is_text() {  # no NUL byte in the file
  tr -d '\000' <"$1" | cmp -s - "$1"
}
cldpd_files() {  # patch|list: without git, the workdir against the copy or listing
  mode=$(cat "$S/mode" 2>/dev/null)
  rel=${S#"$W"/}
  find . \( -path "./$rel" -o -name .git \) -prune -o \( -type f -o -type l \) -print \
    2>/dev/null | sed 's,^\./,,' | sort >"$T/now"
  if [ "$mode" = copy ]; then
    (cd "$S/base" && find . \( -type f -o -type l \) -print | sed 's,^\./,,' | sort) >"$T/then"
  else
    sed 's,^[0-9]* [0-9]* \./,,' "$S/listing" | sort >"$T/then"
  fi
  while IFS= read -r f; do
    if grep -qxF "$f" "$T/then"; then
      cldpd_changed "$f" && cldpd_file M "$f" "$1"
    else
      cldpd_file A "$f" "$1"
    fi
  done <"$T/now"
  while IFS= read -r f; do
    grep -qxF "$f" "$T/now" || cldpd_file D "$f" "$1"
  done <"$T/then"
}
cldpd_changed() {
  if [ "$mode" = copy ]; then
    if [ -L "$1" ] || [ -L "$S/base/$1" ]; then
      [ "$(readlink "$1")" != "$(readlink "$S/base/$1" 2>/dev/null)" ]
    else
      ! cmp -s "$1" "$S/base/$1"
    fi
  else
    now=$(stat -c '%s %Y' "$1" 2>/dev/null)
    ! grep -qxF "$now ./$1" "$S/listing"
  fi
}
cldpd_file() {  # status path patch|list
  if [ "$3" = list ]; then
    if [ "$1" = D ]; then size=0; else size=$(wc -c <"$2" 2>/dev/null || echo 0); fi
    printf '%s\t%s\t%s\n' "$1" "$size" "$2"
    return
  fi
  old=$S/base/$2
  [ "$mode" = copy ] || old=/nonexistent
  echo "diff --git a/$2 b/$2"
  case $1 in
    A) [ -L "$2" ] && echo "new file mode 120000" || echo "new file mode 100644"
       cldpd_body /dev/null "$2" "/dev/null" "b/$2" ;;
    D) [ -L "$old" ] && echo "deleted file mode 120000" || echo "deleted file mode 100644"
       [ -e "$old" ] || [ -L "$old" ] && cldpd_body "$old" /dev/null "a/$2" "/dev/null" ;;
    M) [ -e "$old" ] && cldpd_body "$old" "$2" "a/$2" "b/$2" ;;
  esac
}
cldpd_body() {  # old new old-name new-name: a unified diff of two files (links: targets)
  a=$1; b=$2
  if [ -L "$a" ]; then printf '%s' "$(readlink "$a")" >"$T/a"; a=$T/a; fi
  if [ -L "$b" ]; then printf '%s' "$(readlink "$b")" >"$T/b"; b=$T/b; fi
  if cldpd_is_text "$a" && cldpd_is_text "$b"; then
    echo "--- $3"
    echo "+++ $4"
    diff -U3 "$a" "$b" | sed '1,2d'
  else
    echo "Binary files $3 and $4 differ"
  fi
}
