# Multi-stage build. The build step is scripts/build-release.sh, which CI runs too.
#
#   docker build -t outpost .
#   docker run -p 8080:8080 -v $PWD/my-api.json:/etc/outpost/api.json outpost

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN scripts/build-release.sh

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/outpost --shell /usr/sbin/nologin outpost \
 && mkdir -p /var/lib/outpost/backup /etc/outpost \
 && chown -R outpost /var/lib/outpost
COPY --from=build /src/target/release/outpost /usr/local/bin/outpost
# First-party plugins; add your own here (or mount them) and list them in the manifest.
COPY --from=build /src/target/release/plugins/ /usr/lib/outpost/plugins/
COPY examples/docker/ /etc/outpost/
USER 10001
EXPOSE 8080 8081
# Config backups (filesystem backup store) survive container restarts here.
VOLUME ["/var/lib/outpost/backup"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/outpost"]
CMD ["run", "--manifest", "/etc/outpost/outpost.toml"]
