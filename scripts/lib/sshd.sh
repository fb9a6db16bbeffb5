# A private sshd on 127.0.0.1 for scripts (benchmarks, torture, end-to-end tests).
# Source this file, then:
#   sshd_start DIR      starts sshd with its keys and config under DIR and sets
#                       SSH_PORT, SSH_USER, SSH_KEY (client identity),
#                       SSH_KNOWN_HOSTS, SSHD_PID (its process group leader);
#   sshd_stop           stops it (and the sessions it started).
#   sshd_args           prints hubsync options for it: --identity, --known-hosts.
#   free_port           prints a free TCP port on 127.0.0.1.
# Needs openssh-server and openssh-client; as root, /run/sshd must exist.

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

sshd_start() {
  local dir=$1 try pid banner
  mkdir -p "$dir"
  [ -f "$dir/host_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$dir/host_key"
  [ -f "$dir/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$dir/id_ed25519"
  cp "$dir/id_ed25519.pub" "$dir/authorized_keys"
  SSH_USER="$(id -un)"
  SSH_KEY="$dir/id_ed25519"
  SSH_KNOWN_HOSTS="$dir/known_hosts"
  if [ "$(id -u)" = 0 ]; then mkdir -p /run/sshd; fi
  for try in 1 2 3; do
    SSH_PORT=$(free_port)
    cat >"$dir/sshd_config" <<EOF
ListenAddress 127.0.0.1:$SSH_PORT
HostKey $dir/host_key
PidFile $dir/sshd.pid
AuthorizedKeysFile $dir/authorized_keys
AllowUsers $SSH_USER
UsePAM no
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
MaxStartups 100:30:200
MaxSessions 100
EOF
    setsid /usr/sbin/sshd -D -e -f "$dir/sshd_config" >>"$dir/sshd.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do
      if banner=$(timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$SSH_PORT; head -c 8 <&3" 2>/dev/null) \
        && [ "$banner" = "SSH-2.0-" ]; then
        SSHD_PID=$pid
        echo "[127.0.0.1]:$SSH_PORT $(cut -d' ' -f1,2 "$dir/host_key.pub")" >"$SSH_KNOWN_HOSTS"
        return 0
      fi
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.05
    done
    kill "$pid" 2>/dev/null || true
  done
  echo "sshd did not start (see $dir/sshd.log)" >&2
  return 1
}

sshd_stop() {
  [ -n "${SSHD_PID:-}" ] || return 0
  kill -TERM -- "-$SSHD_PID" 2>/dev/null || true
  SSHD_PID=
}

sshd_args() {
  printf '%s\n' --identity "$SSH_KEY" --known-hosts "$SSH_KNOWN_HOSTS"
}
