#!/bin/sh
# One-shot setup of the farm's MinIO, run by the minio-init service with MinIO's root login:
#   * the bucket of FRAGJOBS_STORAGE_URL (s3://<bucket>/<prefix>): fragjobs never creates one;
#   * the workers' own user (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY of farm.env) with the
#     policy of minio-worker-policy.json, which reaches that bucket and nothing else.
# The root login stays in services.env, on the services host. Safe to run again.
# Shell built-ins and mc only: the mc image has no grep or sed.
set -eu

bucket=${FRAGJOBS_STORAGE_URL#s3://}
bucket=${bucket%%/*}
case "$bucket" in
    "" | *[!a-z0-9.-]*)
        echo "FRAGJOBS_STORAGE_URL must be s3://<bucket>/<prefix>, got '$FRAGJOBS_STORAGE_URL'" >&2
        exit 1
        ;;
esac
if [ "$AWS_ACCESS_KEY_ID" = "$MINIO_ROOT_USER" ]; then
    echo "AWS_ACCESS_KEY_ID is MinIO's root user: give the workers a user of their own" >&2
    exit 1
fi

# The policy file, beside this script, names the bucket {bucket}.
case "$0" in
    */*) here=${0%/*} ;;
    *) here=. ;;
esac
rest=""
while IFS= read -r line || [ -n "$line" ]; do
    rest="$rest$line
"
done <"$here/minio-worker-policy.json"
policy=""
while :; do
    case "$rest" in
        *"{bucket}"*)
            policy="$policy${rest%%"{bucket}"*}$bucket"
            rest=${rest#*"{bucket}"}
            ;;
        *)
            policy="$policy$rest"
            break
            ;;
    esac
done
policy_file="${TMPDIR:-/tmp}/fragjobs-worker-policy.json"
printf '%s' "$policy" >"$policy_file"

mc alias set farm http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing "farm/$bucket"
mc admin policy create farm fragjobs-bucket-rw "$policy_file"
mc admin user add farm "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY"
case "$(mc admin user info farm "$AWS_ACCESS_KEY_ID" --json)" in
    *fragjobs-bucket-rw*) ;; # attached by an earlier run
    *) mc admin policy attach farm fragjobs-bucket-rw --user "$AWS_ACCESS_KEY_ID" ;;
esac
echo "bucket $bucket ready; user $AWS_ACCESS_KEY_ID may use it and nothing else"
