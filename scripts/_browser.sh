# Sourced by scripts/test: the end-to-end tests open the audit report and the relay's /log/ page in
# a real headless browser (Debian's chromium). Installs it when /usr/bin/chromium is missing; if it
# cannot be installed, those tests skip and say why (CLOISTER_BROWSER_MISSING).
if [[ ! -x /usr/bin/chromium ]]; then
  if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
    echo "==> installing Debian's chromium (the report and /log/ page tests open them in it)" >&2
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/tmp/cloister-chromium-install.log 2>&1; then
      export CLOISTER_BROWSER_MISSING="apt-get install chromium failed (see /tmp/cloister-chromium-install.log)"
      echo "could not install chromium: $CLOISTER_BROWSER_MISSING; the browser tests will skip" >&2
    fi
  else
    export CLOISTER_BROWSER_MISSING="no /usr/bin/chromium, and apt-get as root is not available to install it"
    echo "$CLOISTER_BROWSER_MISSING; the browser tests will skip" >&2
  fi
fi
