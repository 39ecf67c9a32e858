# Sourced by scripts/test: Debian tools some tests drive (tests/deploy): shellcheck for the deploy
# scripts, and an nginx binary to check the TLS proxy's site with `nginx -t`. nginx is unpacked, not
# installed (installing it would start a service): `apt-get download` and `dpkg -x` into .venv.
# Without apt-get as root the tests that need them skip and say why.
if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
  if ! command -v shellcheck >/dev/null 2>&1; then
    echo "==> installing Debian's shellcheck (tests/deploy lints the deploy scripts)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck; } \
      >/tmp/cloister-shellcheck-install.log 2>&1 || echo "could not install shellcheck; its test will skip" >&2
  fi
  NGINX_ROOT="$ROOT/.venv/nginx"
  if ! command -v nginx >/dev/null 2>&1 && [[ ! -x "$NGINX_ROOT/usr/sbin/nginx" ]]; then
    echo "==> unpacking Debian's nginx binary into .venv/nginx (tests/deploy checks the proxy site)" >&2
    rm -rf "$NGINX_ROOT" && mkdir -p "$NGINX_ROOT/debs"
    if (cd "$NGINX_ROOT/debs" && apt-get download -qq nginx) >/tmp/cloister-nginx-download.log 2>&1 ||
       { apt-get update -qq && (cd "$NGINX_ROOT/debs" && apt-get download -qq nginx); } >>/tmp/cloister-nginx-download.log 2>&1; then
      for deb in "$NGINX_ROOT"/debs/*.deb; do dpkg -x "$deb" "$NGINX_ROOT"; done
    else
      echo "could not download nginx; its test will skip" >&2
    fi
  fi
  if [[ -z "${CLOISTER_NGINX:-}" && -x "$NGINX_ROOT/usr/sbin/nginx" ]]; then
    export CLOISTER_NGINX="$NGINX_ROOT/usr/sbin/nginx"
  fi
fi
