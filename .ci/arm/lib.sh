# Shared by the ARM stage's scripts (sourced, not run).

# The environment every command inside a root gets: nothing of the host's (its pip
# configuration points at this machine's local wheel folders; a device has none of it).
ARM_ENV=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
         LANG=C.UTF-8 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=120 PYTHONUNBUFFERED=1)

# What uname -m says inside each root (the emulated CPU).
arm_machine() {
  case "$1" in
    arm64) echo aarch64 ;;
    armhf) echo armv7l ;;
    *) return 1 ;;
  esac
}

# Unmount everything under $1 (deepest first). A root must never be deleted while the
# host's /dev or a work folder is bound inside it: rm -rf would go through the mount.
release_mounts() {
  local dir m
  dir=$(realpath -m "$1")
  for _ in 1 2 3; do
    mapfile -t mounts < <(awk -v d="$dir" '$5 == d || index($5, d "/") == 1 {print $5}' /proc/self/mountinfo | sort -r)
    [ ${#mounts[@]} -eq 0 ] && return 0
    for m in "${mounts[@]}"; do
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
  done
  if awk -v d="$dir" '$5 == d || index($5, d "/") == 1 {found=1} END {exit !found}' /proc/self/mountinfo; then
    echo "arm: could not unmount everything under $dir; not touching it" >&2
    return 1
  fi
}
