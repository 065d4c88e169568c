#!/bin/sh
# The entrypoint wrapper of every farm container: refuse to start while a secret is unset or
# still holds the example files' placeholder ("change-me..."), then run the real command.
#
#   check-secrets NAME... -- COMMAND [ARG...]
#
# Shell built-ins only: the MinIO images have no grep or sed.
set -eu

refused=""
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
    eval "value=\${$1-}"
    case "$value" in
        "") refused="$refused $1 (unset)" ;;
        *change-me* | *CHANGE-ME* | *Change-Me*) refused="$refused $1 (placeholder)" ;;
    esac
    shift
done
if [ -n "$refused" ]; then
    echo "refusing to start:$refused; set real secrets in infra/farm.env / infra/services.env" >&2
    exit 78
fi
[ "$#" -gt 0 ] && shift # the --
exec "$@"
