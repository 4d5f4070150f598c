{{/*
Names, labels, images and the contract with the code. Every template builds on these.
*/}}

{{- define "cairn.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Resource-name prefix: the release name, or <release>-cairn when it does not contain "cairn". */}}
{{- define "cairn.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "cairn.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "cairn.labels" -}}
helm.sh/chart: {{ include "cairn.chart" . }}
app.kubernetes.io/name: {{ include "cairn.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cairn
{{- with .Values.tenant }}
cairn.dev/tenant: {{ . }}
{{- end }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "training"). */}}
{{- define "cairn.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cairn.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* All labels of one component. */}}
{{- define "cairn.componentLabels" -}}
{{ include "cairn.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* repository:tag or repository@digest: (dict "image" .Values.image "ctx" $). */}}
{{- define "cairn.imageRef" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "cairn.image" -}}
{{- include "cairn.imageRef" (dict "image" .Values.image "ctx" .) -}}
{{- end -}}

{{- define "cairn.workerImage" -}}
{{- include "cairn.imageRef" (dict "image" .Values.workerImage "ctx" .) -}}
{{- end -}}

{{/*
The NATS users and their least-privilege permissions, generated from the code by
services.security.derive_permissions (what each service publishes comes from contracts PRODUCERS,
which durable consumers it binds from the subscribers it registers) into files/nats-permissions.json;
tests/test_helm_chart.py fails when the file drifts from the code and regenerates it with
`python -m tests.test_helm_chart --write-permissions`.
*/}}
{{- define "cairn.natsGenerated" -}}
{{- .Files.Get "files/nats-permissions.json" -}}
{{- end -}}

{{/*
The chart's one addition: `operator`, the identity of the toolbox and the `helm test` pod. It
submits data (publishes data.arrived, as `upstream` may), follows the log through ordered
consumers (`cairn events`, `cairn submit --wait`) and reads consumer state (`cairn status`); it
cannot bind or ack any service's consumer, delete anything or administer the stream.
*/}}
{{- define "cairn.operatorPermissions" -}}
{{- $s := .Values.config.stream -}}
{{- $pub := list "cairn.data.arrived.v1" "$JS.API.STREAM.NAMES" (printf "$JS.API.STREAM.INFO.%s" $s) (printf "$JS.API.CONSUMER.CREATE.%s" $s) (printf "$JS.API.CONSUMER.INFO.%s.*" $s) (printf "$JS.API.CONSUMER.DELETE.%s.*" $s) (printf "$JS.FC.%s.>" $s) -}}
{{- toJson (dict "publish" $pub "subscribe" (list "_INBOX_operator.>")) -}}
{{- end -}}

{{/* Every user's permissions, {user: {publish: [...], subscribe: [...]}}, as JSON. */}}
{{- define "cairn.natsPermissions" -}}
{{- $users := deepCopy (include "cairn.natsGenerated" . | fromJson).users -}}
{{- $_ := set $users "operator" (include "cairn.operatorPermissions" . | fromJson) -}}
{{- toJson $users -}}
{{- end -}}

{{/* Durable consumers of each service, {service: [durable, ...]}: KEDA scales on their lag. */}}
{{- define "cairn.durables" -}}
{{- toJson (include "cairn.natsGenerated" . | fromJson).durables -}}
{{- end -}}

{{/* NATS user names, sorted. */}}
{{- define "cairn.natsUsers" -}}
{{- toJson (keys (include "cairn.natsPermissions" . | fromJson) | sortAlpha) -}}
{{- end -}}

{{/* Environment variable the NATS server reads a user's password from. */}}
{{- define "cairn.natsPasswordEnv" -}}
{{- printf "CAIRN_NATS_PASSWORD_%s" (upper .) -}}
{{- end -}}

{{/*
One entry of a users list of the server config: (dict "user" "training" "env" "CAIRN_NATS_PASSWORD_TRAINING"
"perms" {publish: [...], subscribe: [...]}). The password is the variable the server resolves.
*/}}
{{- define "cairn.natsUserEntry" -}}
{user: {{ .user | quote }}, password: ${{ .env }}, permissions: {{ .perms | toJson | replace "\\u003e" ">" }}}
{{- end -}}

{{/*
Tenants (docs/TENANTS.md): a tenant is a NATS account of the in-chart server holding every role of
the default tenant as the user <role>@<tenant> (services.platform.settings nats_user_name); the
default tenant (""), the bare role. (dict "role" "training" "tenant" "team-a")
*/}}
{{- define "cairn.tenantUser" -}}
{{- if .tenant -}}
{{- printf "%s@%s" .role .tenant -}}
{{- else -}}
{{- .role -}}
{{- end -}}
{{- end -}}

{{/*
The variable the server reads a tenant user's password from: CAIRN_NATS_PASSWORD_<TENANT>_<ROLE>,
'-' as '_'. A tenant name has no '_' and a role neither '-' nor '_', so two users never share one
(and cairn.validateValues fails the render if they ever did). (dict "role" "training" "tenant" "team-a")
*/}}
{{- define "cairn.tenantPasswordEnv" -}}
{{- printf "CAIRN_NATS_PASSWORD_%s_%s" (.tenant | upper | replace "-" "_") (upper .role) -}}
{{- end -}}

{{/*
A tenant user's permissions, {publish, subscribe}: the role's, except its reply inbox, which is
named after the user (_INBOX_<role>@<tenant>: services/platform/bus/connection.py inbox_prefix).
(dict "perms" $rolePermissions "role" "training" "tenant" "team-a")
*/}}
{{- define "cairn.tenantPermissions" -}}
{{- $prefix := printf "_INBOX_%s." .role -}}
{{- $out := dict -}}
{{- range $kind, $subjects := .perms -}}
{{- $renamed := list -}}
{{- range $subjects -}}
{{- $renamed = append $renamed (ternary (printf "_INBOX_%s@%s.%s" $.role $.tenant (trimPrefix $prefix .)) . (hasPrefix $prefix .)) -}}
{{- end -}}
{{- $_ := set $out $kind $renamed -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* The names of the tenants this release defines, as a JSON list. */}}
{{- define "cairn.tenantNames" -}}
{{- $names := list -}}
{{- range .Values.tenants -}}
{{- $names = append $names .name -}}
{{- end -}}
{{- toJson $names -}}
{{- end -}}

{{/* A NATS size of the values (a string such as 10G, or bytes) as the server config takes it. */}}
{{- define "cairn.natsSize" -}}
{{- if kindIs "string" . -}}
{{- . -}}
{{- else -}}
{{- int64 . -}}
{{- end -}}
{{- end -}}

{{/*
The JetStream account of this release's users, which KEDA's nats-jetstream scaler names: the
tenant's (`tenant`); `default` where this release defines tenants (the server then has accounts,
and the global account $G no JetStream); nats.auth.account otherwise.
*/}}
{{- define "cairn.natsAccount" -}}
{{- if .Values.tenant -}}
{{- .Values.tenant -}}
{{- else if .Values.tenants -}}
default
{{- else -}}
{{- .Values.nats.auth.account -}}
{{- end -}}
{{- end -}}

{{- define "cairn.natsSecretName" -}}
{{- default (printf "%s-nats-auth" (include "cairn.fullname" .)) .Values.nats.auth.existingSecret -}}
{{- end -}}

{{- define "cairn.natsHost" -}}
{{- printf "%s-nats" (include "cairn.fullname" .) -}}
{{- end -}}

{{- define "cairn.natsUrl" -}}
{{- if .Values.nats.internal.enabled -}}
{{- printf "%s://%s.%s.svc:%d" (ternary "tls" "nats" (eq (include "cairn.tls" .) "true")) (include "cairn.natsHost" .) .Release.Namespace (int .Values.nats.internal.clientPort) -}}
{{- else -}}
{{- .Values.nats.external.url -}}
{{- end -}}
{{- end -}}

{{- define "cairn.natsMonitoringEndpoint" -}}
{{- if .Values.nats.internal.enabled -}}
{{- printf "%s.%s.svc:%d" (include "cairn.natsHost" .) .Release.Namespace (int .Values.nats.internal.monitorPort) -}}
{{- else -}}
{{- .Values.nats.external.monitoringEndpoint -}}
{{- end -}}
{{- end -}}

{{- define "cairn.mlflowUri" -}}
{{- if .Values.mlflow.enabled -}}
{{- printf "http://%s-mlflow.%s.svc:%d" (include "cairn.fullname" .) .Release.Namespace (int .Values.mlflow.port) -}}
{{- else -}}
{{- .Values.mlflow.external.uri -}}
{{- end -}}
{{- end -}}

{{- define "cairn.daskClusterName" -}}
{{- default (printf "%s-dask" (include "cairn.fullname" .)) .Values.dask.clusterName -}}
{{- end -}}

{{/* The Dask operator objects are rendered: operator mode and its CRDs present (flag or API). */}}
{{- define "cairn.daskOperatorObjects" -}}
{{- if and (eq .Values.dask.mode "operator") (or .Values.dask.operator.crdsInstalled (.Capabilities.APIVersions.Has "kubernetes.dask.org/v1/DaskCluster")) -}}
true
{{- end -}}
{{- end -}}

{{/*
TLS, on unless `insecure: true` (tls.enabled=false alone fails the render: cairn.validateValues).
NATS: the server (and its routes) and every client, mutual: clients present a certificate from the
server's CA, then their user and password. Dask: scheduler, workers and training, mutual.
*/}}
{{- define "cairn.tls" -}}
{{- if not .Values.insecure -}}
true
{{- end -}}
{{- end -}}

{{/* The NATS server's certificate (the in-chart server): ca.crt, tls.crt, tls.key. */}}
{{- define "cairn.natsServerSecret" -}}
{{- default (printf "%s-nats-tls" (include "cairn.fullname" .)) .Values.nats.tls.secretName -}}
{{- end -}}

{{/* The NATS clients' certificate (every NATS client pod): ca.crt, tls.crt, tls.key. */}}
{{- define "cairn.natsClientSecret" -}}
{{- default (printf "%s-nats-client-tls" (include "cairn.fullname" .)) .Values.nats.tls.clientSecretName -}}
{{- end -}}

{{/* Dask's certificate (scheduler, workers, training): ca.crt, tls.crt, tls.key. */}}
{{- define "cairn.daskTLSSecret" -}}
{{- default (printf "%s-dask-tls" (include "cairn.fullname" .)) .Values.dask.tls.secretName -}}
{{- end -}}

{{/* The CAs and their keys, kept by the hook so upgrades do not rotate them; only the hook reads it. */}}
{{- define "cairn.tlsCASecret" -}}
{{- printf "%s-tls-ca" (include "cairn.fullname" .) -}}
{{- end -}}

{{/* The names of the in-chart NATS server's certificate: the Service and every pod of the headless one (routes). */}}
{{- define "cairn.natsHosts" -}}
{{- $host := include "cairn.natsHost" . -}}
{{- $ns := .Release.Namespace -}}
{{- list $host (printf "%s.%s" $host $ns) (printf "%s.%s.svc" $host $ns) (printf "%s.%s.svc.cluster.local" $host $ns) (printf "*.%s-headless.%s.svc" $host $ns) (printf "*.%s-headless.%s.svc.cluster.local" $host $ns) | toJson -}}
{{- end -}}

{{/*
What the chart issues itself (the hook Job, or cert-manager), {"nats": bool, "dask": bool}: the
in-chart server's certificates unless nats.tls.secretName/clientSecretName bring them, Dask's
unless dask.tls.secretName does (and not for dask.mode=local, which needs none).
*/}}
{{- define "cairn.tlsIssued" -}}
{{- $on := eq (include "cairn.tls" .) "true" -}}
{{- $nats := and $on .Values.nats.internal.enabled (not .Values.nats.tls.secretName) (not .Values.nats.tls.clientSecretName) -}}
{{- $dask := and $on (eq (include "cairn.daskTLS" .) "true") (not .Values.dask.tls.secretName) -}}
{{- toJson (dict "nats" $nats "dask" $dask) -}}
{{- end -}}

{{/* The hook Job issues certificates (TLS on, cert-manager off, something to issue). */}}
{{- define "cairn.tlsHook" -}}
{{- $issued := include "cairn.tlsIssued" . | fromJson -}}
{{- if and (include "cairn.tls" .) (not .Values.tls.certManager.enabled) (or $issued.nats $issued.dask) -}}
true
{{- end -}}
{{- end -}}

{{/*
OpenSSF model signing of champions (services.platform.model_signatures), on unless `insecure: true`
(modelSigning.enabled=false alone fails the render: cairn.validateValues). One Secret holds the
pair: private.pem, mounted only into the service with services.<name>.signsModels (deployment:
CAIRN_MODEL_SIGNING_KEY), and public.pem, mounted only into the inference endpoint
(CAIRN_MODEL_VERIFY_KEY). No other pod reads it.
*/}}
{{- define "cairn.modelSigning" -}}
{{- if not .Values.insecure -}}
true
{{- end -}}
{{- end -}}

{{- define "cairn.modelSigningSecret" -}}
{{- default (printf "%s-model-signing" (include "cairn.fullname" .)) .Values.modelSigning.existingSecret -}}
{{- end -}}

{{/* The hook Job makes the pair: signing on, no existingSecret; in every TLS mode, cert-manager's too. */}}
{{- define "cairn.modelSigningIssued" -}}
{{- if and (include "cairn.modelSigning" .) (not .Values.modelSigning.existingSecret) -}}
true
{{- end -}}
{{- end -}}

{{/* The hook Job runs: certificates to issue (cairn.tlsHook) or the model-signing pair to make. */}}
{{- define "cairn.keysHook" -}}
{{- if or (include "cairn.tlsHook" .) (include "cairn.modelSigningIssued" .) -}}
true
{{- end -}}
{{- end -}}

{{- define "cairn.modelSigningDir" -}}/etc/cairn/model-signing{{- end -}}

{{/* One key of the pair, and nothing else of the Secret (0440: the pod's fsGroup reads it):
(dict "ctx" $ "key" "private.pem"). */}}
{{- define "cairn.modelSigningVolume" -}}
- name: model-signing
  secret:
    secretName: {{ include "cairn.modelSigningSecret" .ctx }}
    defaultMode: 288
    items:
      - {key: {{ .key }}, path: {{ .key }}}
{{- end -}}

{{- define "cairn.modelSigningMount" -}}
- name: model-signing
  mountPath: {{ include "cairn.modelSigningDir" . }}
  readOnly: true
{{- end -}}

{{/* NATS client TLS: the client certificate mounted at /etc/cairn/nats-tls (mode 0440). */}}
{{- define "cairn.natsTLSDir" -}}/etc/cairn/nats-tls{{- end -}}

{{- define "cairn.natsTLSVolume" -}}
- name: nats-tls
  secret:
    secretName: {{ include "cairn.natsClientSecret" . }}
    defaultMode: 288
    items:
      - {key: ca.crt, path: ca.crt}
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
{{- end -}}

{{- define "cairn.natsTLSMount" -}}
- name: nats-tls
  mountPath: {{ include "cairn.natsTLSDir" . }}
  readOnly: true
{{- end -}}

{{/* What services.platform.bus.connection.tls_context reads (services/platform/settings.py: nats_tls_*). */}}
{{- define "cairn.natsTLSEnv" -}}
{{- $dir := include "cairn.natsTLSDir" . -}}
- name: CAIRN_NATS_TLS_CA
  value: {{ $dir }}/ca.crt
- name: CAIRN_NATS_TLS_CERT
  value: {{ $dir }}/tls.crt
- name: CAIRN_NATS_TLS_KEY
  value: {{ $dir }}/tls.key
{{- end -}}

{{/*
Dask mutual TLS: scheduler, workers and training hold the Secret's certificate, and nothing
without it is let in. Dask runs the pickled tasks it is sent, so this is what keeps code out of
the workers. The local mode has its own (loopback, throwaway certificate: services/platform/compute.py).
*/}}
{{- define "cairn.daskTLS" -}}
{{- if and (include "cairn.tls" .) (ne .Values.dask.mode "local") -}}
true
{{- end -}}
{{- end -}}

{{- define "cairn.daskTLSDir" -}}/etc/cairn/dask-tls{{- end -}}

{{/* The chart's scheduler Service, as the operator names it (tls:// unless insecure). */}}
{{- define "cairn.daskSchedulerAddress" -}}
{{- printf "%s://%s-scheduler.%s.svc:8786" (ternary "tls" "tcp" (eq (include "cairn.daskTLS" .) "true")) (include "cairn.daskClusterName" .) .Release.Namespace -}}
{{- end -}}

{{/* `dask scheduler` and `dask worker` flags: listen and connect on tls:// only. */}}
{{- define "cairn.daskTLSArgs" -}}
{{- $dir := include "cairn.daskTLSDir" . -}}
- --tls-ca-file
- {{ $dir }}/ca.crt
- --tls-cert
- {{ $dir }}/tls.crt
- --tls-key
- {{ $dir }}/tls.key
{{- end -}}

{{/* The training client's identity (services/platform/dask_tls.py: client_security). */}}
{{- define "cairn.daskTLSEnv" -}}
{{- $dir := include "cairn.daskTLSDir" . -}}
- name: CAIRN_DASK_TLS_CA
  value: {{ $dir }}/ca.crt
- name: CAIRN_DASK_TLS_CERT
  value: {{ $dir }}/tls.crt
- name: CAIRN_DASK_TLS_KEY
  value: {{ $dir }}/tls.key
{{- end -}}

{{/* Dask's default scheduler HTTP routes plus its API (the operator's way in under TLS). */}}
{{- define "cairn.daskSchedulerHttpRoutes" -}}
{{- list "distributed.http.scheduler.prometheus" "distributed.http.scheduler.info" "distributed.http.scheduler.json" "distributed.http.health" "distributed.http.proxy" "distributed.http.statics" "distributed.http.scheduler.api" | toJson -}}
{{- end -}}

{{/* Readable by the pod's fsGroup (uid 10001's group) only: 0440. */}}
{{- define "cairn.daskTLSVolume" -}}
- name: dask-tls
  secret:
    secretName: {{ include "cairn.daskTLSSecret" . }}
    defaultMode: 288
    items:
      - {key: ca.crt, path: ca.crt}
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
{{- end -}}

{{- define "cairn.daskTLSMount" -}}
- name: dask-tls
  mountPath: {{ include "cairn.daskTLSDir" . }}
  readOnly: true
{{- end -}}

{{- define "cairn.artifactsVolume" -}}
{{- if and (not .Values.artifacts.url) .Values.artifacts.sharedVolume.enabled -}}
true
{{- end -}}
{{- end -}}

{{- define "cairn.artifactsClaim" -}}
{{- default (printf "%s-artifacts" (include "cairn.fullname" .)) .Values.artifacts.sharedVolume.existingClaim -}}
{{- end -}}

{{/*
Replicas of the stream and every bucket: config.streamReplicas when set, else the chart's own NATS
server count (3 servers: R3, so a cluster is not left holding single-copy streams), else 1.
*/}}
{{- define "cairn.streamReplicas" -}}
{{- if not (kindIs "invalid" .Values.config.streamReplicas) -}}
{{- .Values.config.streamReplicas | int -}}
{{- else if .Values.nats.internal.enabled -}}
{{- min (int .Values.nats.internal.replicas) 5 -}}
{{- else -}}
1
{{- end -}}
{{- end -}}

{{/*
Environment of every cairn process except the NATS identity (cairn.natsEnv adds that).
*/}}
{{- define "cairn.env" -}}
- name: CAIRN_HOME
  value: /var/lib/cairn/home
- name: CAIRN_NATS_URL
  value: {{ include "cairn.natsUrl" . | quote }}
- name: CAIRN_STREAM
  value: {{ .Values.config.stream | quote }}
- name: CAIRN_STREAM_REPLICAS
  value: {{ include "cairn.streamReplicas" . | quote }}
- name: CAIRN_ACK_WAIT_S
  value: {{ .Values.config.ackWaitSeconds | quote }}
- name: CAIRN_MAX_DELIVER
  value: {{ .Values.config.maxDeliver | quote }}
- name: CAIRN_LOG_LEVEL
  value: {{ .Values.config.logLevel | quote }}
- name: CAIRN_ALLOWED_SCHEMES
  value: {{ .Values.config.allowedSchemes | toJson | quote }}
- name: CAIRN_ALLOWED_ROOTS
  value: {{ .Values.config.allowedRoots | toJson | quote }}
- name: CAIRN_ARTIFACTS_URL
  value: {{ default "file:///var/lib/cairn/artifacts" .Values.artifacts.url | quote }}
- name: CAIRN_MLFLOW_URI
  value: {{ include "cairn.mlflowUri" . | quote }}
- name: CAIRN_DASK
  value: {{ include "cairn.daskSetting" . | quote }}
- name: CAIRN_DASK_K8S_CLUSTER
  value: {{ include "cairn.daskClusterName" . | quote }}
- name: CAIRN_DASK_K8S_NAMESPACE
  value: {{ .Release.Namespace | quote }}
- name: CAIRN_DASK_IMAGE
  value: {{ include "cairn.workerImage" . | quote }}
{{- /* The chart creates <cluster>-gpu itself; training finds it and does not add another. */}}
- name: CAIRN_DASK_GPU_WORKERS
  value: {{ ternary .Values.dask.gpuWorkers.replicas 0 .Values.dask.gpuWorkers.enabled | quote }}
- name: CAIRN_HTTP_PORT
  value: {{ .Values.probes.port | quote }}
{{- with .Values.config.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "cairn.daskSetting" -}}
{{- if eq .Values.dask.mode "operator" -}}kubernetes
{{- else if eq .Values.dask.mode "external" -}}{{ .Values.dask.external.address }}
{{- else -}}local
{{- end -}}
{{- end -}}

{{/* A NATS client's identity: its certificate (TLS) and CAIRN_NATS_USER / CAIRN_NATS_PASSWORD
of one user: (dict "ctx" $ "user" "training"). */}}
{{- define "cairn.natsEnv" -}}
{{- if include "cairn.tls" .ctx }}
{{ include "cairn.natsTLSEnv" .ctx }}
{{- end }}
{{- if .ctx.Values.nats.auth.enabled }}
- name: CAIRN_NATS_USER
  value: {{ include "cairn.tenantUser" (dict "role" .user "tenant" .ctx.Values.tenant) | quote }}
- name: CAIRN_NATS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "cairn.natsSecretName" .ctx }}
      key: {{ printf "%s-password" .user }}
{{- end }}
{{- /* A tenant's release: its state, artifacts and MLflow names are the tenant's (docs/TENANTS.md). */}}
{{- with .ctx.Values.tenant }}
- name: CAIRN_TENANT
  value: {{ . | quote }}
{{- end -}}
{{- end -}}

{{- define "cairn.envFrom" -}}
{{- with .Values.config.extraEnvFrom }}
envFrom:
{{ toYaml . }}
{{- end -}}
{{- end -}}

{{/*
Volumes of a cairn pod: writable home and /tmp (read-only root), the shared artifact volume, the
NATS client certificate. (dict "ctx" $ "artifacts" true "nats" true): artifacts false leaves the
artifact volume out (a service with services.<name>.artifacts=false); nats false the certificate
(a Dask worker, which does not talk to NATS).
*/}}
{{- define "cairn.volumes" -}}
{{- $ := .ctx -}}
- name: home
  emptyDir: {}
- name: tmp
  emptyDir: {}
{{- if and .artifacts (include "cairn.artifactsVolume" $) }}
- name: artifacts
  persistentVolumeClaim:
    claimName: {{ include "cairn.artifactsClaim" $ }}
{{- end }}
{{- if and .nats (include "cairn.tls" $) }}
{{ include "cairn.natsTLSVolume" $ }}
{{- end }}
{{- end -}}

{{/* The mounts of cairn.volumes: (dict "ctx" $ "artifacts" true "nats" true). */}}
{{- define "cairn.volumeMounts" -}}
{{- $ := .ctx -}}
- name: home
  mountPath: /var/lib/cairn/home
- name: tmp
  mountPath: /tmp
{{- if and .artifacts (include "cairn.artifactsVolume" $) }}
- name: artifacts
  mountPath: /var/lib/cairn/artifacts
{{- end }}
{{- if and .nats (include "cairn.tls" $) }}
{{ include "cairn.natsTLSMount" $ }}
{{- end }}
{{- end -}}

{{- define "cairn.podAnnotations" -}}
{{- if .ctx.Values.metrics.podAnnotations -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end -}}
{{- end -}}

{{- define "cairn.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{ toYaml . }}
{{- end -}}
{{- end -}}

{{/*
Deep-merges .src into .dst in place: (dict "dst" $map "src" $map). Maps merge key by key; lists
and scalars (false and 0 included) replace; a null removes the key. Unlike mergeOverwrite, the
result does not depend on the Helm version's merge library.
*/}}
{{- define "cairn.deepMerge" -}}
{{- $dst := .dst -}}
{{- range $key, $value := .src -}}
{{- if kindIs "invalid" $value -}}
{{- $_ := unset $dst $key -}}
{{- else if and (kindIs "map" $value) (kindIs "map" (get $dst $key)) -}}
{{- include "cairn.deepMerge" (dict "dst" (get $dst $key) "src" $value) -}}
{{- else -}}
{{- $_ := set $dst $key (deepCopy $value) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The values of one service: serviceDefaults with services.<name> deep-merged over them (cairn.deepMerge),
so a service lists only what differs. Written into .out, which keeps the values' own types:
  {{- $svc := dict }}{{- $_ := include "cairn.service" (dict "ctx" $ "name" $name "out" $svc) }}
*/}}
{{- define "cairn.service" -}}
{{- $_ := include "cairn.deepMerge" (dict "dst" .out "src" .ctx.Values.serviceDefaults) -}}
{{- $_ = include "cairn.deepMerge" (dict "dst" .out "src" (index .ctx.Values.services .name)) -}}
{{- end -}}

{{/*
A probe of a service container: the service's probe (services.<name>.<kind>Probe over
serviceDefaults.<kind>Probe) over the timings of probes.<kind>, the ones the inference endpoint
uses too. (dict "probe" $svc.livenessProbe "timings" $.Values.probes.liveness)
*/}}
{{- define "cairn.probe" -}}
{{- $probe := deepCopy .timings -}}
{{- $_ := include "cairn.deepMerge" (dict "dst" $probe "src" .probe) -}}
{{- toYaml $probe -}}
{{- end -}}

{{/*
The NATS users' passwords the chart generates, {"<user>-password": base64}: the ones the cluster
holds (upgrades; `lookup`), new random ones otherwise. Computed once per render and kept in
.Values (the one object every template of a render shares), so the Secret and the pods'
checksum/nats-auth annotation see the same passwords.
*/}}
{{- define "cairn.natsGeneratedPasswords" -}}
{{- if not (hasKey .Values "__cairnNatsPasswords") -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "cairn.natsSecretName" .) -}}
{{- $data := dict -}}
{{- range $user := include "cairn.natsUsers" . | fromJsonArray -}}
{{- $key := printf "%s-password" $user -}}
{{- $_ := set $data $key ((and $existing $existing.data (index $existing.data $key)) | default (randAlphaNum 32 | b64enc)) -}}
{{- end -}}
{{- $_ := set .Values "__cairnNatsPasswords" $data -}}
{{- end -}}
{{- toJson (get .Values "__cairnNatsPasswords") -}}
{{- end -}}

{{/*
Checksum of a Secret the chart does not render (an existingSecret, a TLS secret): its name and
its data as the cluster holds it at install/upgrade time (`lookup`). Where lookup sees no cluster
(`helm template`, Argo CD) it hashes the name alone. (dict "ctx" $ "name" "cairn-dask-tls")
*/}}
{{- define "cairn.secretChecksum" -}}
{{- $secret := lookup "v1" "Secret" .ctx.Release.Namespace .name -}}
{{- printf "%s %s" .name (dig "data" dict $secret | toJson) | sha256sum -}}
{{- end -}}

{{/*
checksum/* annotations of a pod, one per Secret it reads, so that a changed Secret rolls it on
the next install/upgrade: (dict "ctx" $ "nats" true "natsServer" false "daskTLS" false "lineageDB" false
"modelSigning" false).
  nats-auth   the NATS users' passwords (the generated Secret's rendered text, or an existingSecret)
  nats-tenants  every tenant's Secret (its users' passwords), read by the NATS servers only (natsServer)
  nats-tls    the NATS client certificate every client mounts (natsServer: the server's certificate)
  dask-tls    Dask's certificate (a Dask client: services.<name>.dask)
  lineage-db  lineage.database.existingSecret (the lineage store's URL: services.<name>.lineageStore)
  model-signing  the model-signing pair (modelSigning: the signsModels service and the inference endpoint)
*/}}
{{- define "cairn.checksums" -}}
{{- $ := .ctx -}}
{{- $out := dict -}}
{{- if and .nats $.Values.nats.auth.enabled -}}
{{- if $.Values.nats.auth.existingSecret -}}
{{- $_ := set $out "checksum/nats-auth" (include "cairn.secretChecksum" (dict "ctx" $ "name" $.Values.nats.auth.existingSecret)) -}}
{{- else -}}
{{- $_ := set $out "checksum/nats-auth" (include (print $.Template.BasePath "/common/nats-auth-secret.yaml") $ | sha256sum) -}}
{{- end -}}
{{- end -}}
{{- if and .nats .natsServer $.Values.nats.auth.enabled $.Values.tenants -}}
{{- $sums := list -}}
{{- range $t := $.Values.tenants -}}
{{- $sums = append $sums (include "cairn.secretChecksum" (dict "ctx" $ "name" $t.secret)) -}}
{{- end -}}
{{- $_ := set $out "checksum/nats-tenants" (join " " $sums | sha256sum) -}}
{{- end -}}
{{- if and .nats (include "cairn.tls" $) -}}
{{- $name := ternary (include "cairn.natsServerSecret" $) (include "cairn.natsClientSecret" $) (eq (toString .natsServer) "true") -}}
{{- $_ := set $out "checksum/nats-tls" (include "cairn.secretChecksum" (dict "ctx" $ "name" $name)) -}}
{{- end -}}
{{- if and .daskTLS (include "cairn.daskTLS" $) -}}
{{- $_ := set $out "checksum/dask-tls" (include "cairn.secretChecksum" (dict "ctx" $ "name" (include "cairn.daskTLSSecret" $))) -}}
{{- end -}}
{{- if and .lineageDB $.Values.lineage.database.existingSecret -}}
{{- $_ := set $out "checksum/lineage-db" (include "cairn.secretChecksum" (dict "ctx" $ "name" $.Values.lineage.database.existingSecret)) -}}
{{- end -}}
{{- if and .modelSigning (include "cairn.modelSigning" $) -}}
{{- $_ := set $out "checksum/model-signing" (include "cairn.secretChecksum" (dict "ctx" $ "name" (include "cairn.modelSigningSecret" $))) -}}
{{- end -}}
{{- with $out }}{{ toYaml . }}{{ end -}}
{{- end -}}

{{/*
Combinations the schema cannot express; each fails the render with the reason.
*/}}
{{- define "cairn.validateValues" -}}
{{- $errors := list -}}
{{- if and (not .Values.nats.internal.enabled) (not .Values.nats.external.url) -}}
{{- $errors = append $errors "nats: nats.internal.enabled=false needs nats.external.url (nats://host:4222)" -}}
{{- end -}}
{{- if and .Values.nats.internal.enabled .Values.nats.external.url -}}
{{- $errors = append $errors "nats: set either nats.internal.enabled or nats.external.url, not both" -}}
{{- end -}}
{{- if and (not .Values.nats.internal.enabled) .Values.nats.auth.enabled (not .Values.nats.auth.existingSecret) -}}
{{- $errors = append $errors "nats: an external server needs nats.auth.existingSecret with the passwords its users were configured with (cairn nats-config)" -}}
{{- end -}}
{{- if and (not .Values.tls.enabled) (not .Values.insecure) -}}
{{- $errors = append $errors "tls: tls.enabled=false alone does not turn TLS off (NATS and Dask would carry credentials and pickled code in the clear); to run without TLS, set insecure: true" -}}
{{- end -}}
{{- if and (not .Values.modelSigning.enabled) (not .Values.insecure) -}}
{{- $errors = append $errors "modelSigning: modelSigning.enabled=false alone does not turn model signing off (the inference endpoint would serve any model whose bytes match the hash an event names, whoever chose them); to run without it, set insecure: true" -}}
{{- end -}}
{{- if include "cairn.tls" . -}}
{{- if and .Values.tls.certManager.enabled (not .Values.tls.certManager.issuerRef.name) -}}
{{- $errors = append $errors "tls: tls.certManager.enabled=true needs tls.certManager.issuerRef.name (the Issuer or ClusterIssuer that signs the NATS certificates)" -}}
{{- end -}}
{{- if and .Values.nats.internal.enabled (ne (empty .Values.nats.tls.secretName) (empty .Values.nats.tls.clientSecretName)) -}}
{{- $errors = append $errors "nats: nats.tls.secretName and nats.tls.clientSecretName go together: the clients' certificate must come from the CA the server verifies" -}}
{{- end -}}
{{- if not .Values.nats.internal.enabled -}}
{{- if not .Values.nats.tls.clientSecretName -}}
{{- $errors = append $errors "nats: with TLS (the default) an external server needs nats.tls.clientSecretName (ca.crt of its CA, tls.crt/tls.key the clients present), or insecure: true" -}}
{{- end -}}
{{- if and .Values.nats.external.url (not (hasPrefix "tls://" .Values.nats.external.url)) -}}
{{- $errors = append $errors "nats: with TLS (the default) nats.external.url must be tls://, or set insecure: true" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .Values.nats.internal.enabled (gt (int (include "cairn.streamReplicas" .)) (int .Values.nats.internal.replicas)) -}}
{{- $errors = append $errors (printf "nats: config.streamReplicas=%d exceeds nats.internal.replicas=%d" (int (include "cairn.streamReplicas" .)) (int .Values.nats.internal.replicas)) -}}
{{- end -}}
{{- if and (not .Values.mlflow.enabled) (not .Values.mlflow.external.uri) -}}
{{- $errors = append $errors "mlflow: mlflow.enabled=false needs mlflow.external.uri" -}}
{{- end -}}
{{- if and .Values.mlflow.enabled (not .Values.postgresql.enabled) (not .Values.mlflow.backendStore.existingSecret) -}}
{{- $errors = append $errors "mlflow: postgresql.enabled=false needs mlflow.backendStore.existingSecret (a secret with the database URL)" -}}
{{- end -}}
{{- if and (eq .Values.dask.mode "external") (not .Values.dask.external.address) -}}
{{- $errors = append $errors "dask: dask.mode=external needs dask.external.address (tls://host:8786)" -}}
{{- end -}}
{{- if and .Values.dask.gpuWorkers.enabled (ne .Values.dask.mode "operator") -}}
{{- $errors = append $errors "dask: dask.gpuWorkers needs dask.mode=operator" -}}
{{- end -}}
{{- if eq .Values.dask.mode "external" -}}
{{- if and (include "cairn.tls" .) .Values.dask.external.address (not (hasPrefix "tls://" .Values.dask.external.address)) -}}
{{- $errors = append $errors "dask: with TLS (the default) dask.external.address must be tls:// (or set insecure: true)" -}}
{{- end -}}
{{- if and .Values.insecure (hasPrefix "tls://" .Values.dask.external.address) -}}
{{- $errors = append $errors "dask: a tls:// dask.external.address needs TLS: drop insecure: true" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.mlflow.enabled (gt (int .Values.mlflow.replicas) 1) (not .Values.mlflow.artifacts.destination) -}}
{{- $errors = append $errors "mlflow: replicas > 1 need mlflow.artifacts.destination (an object store); the local artifact volume is ReadWriteOnce" -}}
{{- end -}}
{{- if and (not .Values.artifacts.url) (not .Values.artifacts.sharedVolume.enabled) -}}
{{- $errors = append $errors "artifacts: set artifacts.url (e.g. s3://bucket/cairn) or enable artifacts.sharedVolume: services and Dask workers must share one store" -}}
{{- end -}}
{{- if .Values.tenants -}}
{{- if not .Values.nats.internal.enabled -}}
{{- $errors = append $errors "tenants: tenants are accounts of the chart's own NATS server (nats.internal.enabled); define them on an external server with `cairn tenant add` / `cairn nats-config`" -}}
{{- end -}}
{{- if not .Values.nats.auth.enabled -}}
{{- $errors = append $errors "tenants: a tenant is a NATS account with users of its own: tenants need nats.auth.enabled" -}}
{{- end -}}
{{- $names := list -}}
{{- range $t := .Values.tenants -}}
{{- if has $t.name $names -}}
{{- $errors = append $errors (printf "tenants: %s is listed twice" $t.name) -}}
{{- end -}}
{{- $names = append $names $t.name -}}
{{- end -}}
{{- /* Every user's password variable is its own (cairn.tenantPasswordEnv). */ -}}
{{- $users := include "cairn.natsUsers" . | fromJsonArray -}}
{{- $envs := dict -}}
{{- range $user := $users -}}
{{- $_ := set $envs (include "cairn.natsPasswordEnv" $user) $user -}}
{{- end -}}
{{- range $t := .Values.tenants -}}
{{- range $role := $users -}}
{{- $at := dict "role" $role "tenant" $t.name -}}
{{- $env := include "cairn.tenantPasswordEnv" $at -}}
{{- $user := include "cairn.tenantUser" $at -}}
{{- if and (hasKey $envs $env) (ne (get $envs $env) $user) -}}
{{- $errors = append $errors (printf "tenants: users %s and %s would share the password variable %s" (get $envs $env) $user $env) -}}
{{- end -}}
{{- $_ := set $envs $env $user -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if .Values.tenant -}}
{{- if .Values.nats.internal.enabled -}}
{{- $errors = append $errors (printf "tenant: the services of tenant %s use the NATS of the release that defines it: set nats.internal.enabled=false and nats.external.url to that server" .Values.tenant) -}}
{{- end -}}
{{- if not .Values.nats.auth.enabled -}}
{{- $errors = append $errors (printf "tenant: tenant %s's users need nats.auth.enabled" .Values.tenant) -}}
{{- end -}}
{{- if not .Values.nats.auth.existingSecret -}}
{{- $errors = append $errors (printf "tenant: set nats.auth.existingSecret to tenant %s's Secret (its users' passwords, as the defining release's tenants[].secret)" .Values.tenant) -}}
{{- end -}}
{{- end -}}
{{- $generated := include "cairn.natsGenerated" . | fromJson -}}
{{- if and .Values.nats.auth.enabled (ne .Values.config.stream $generated.stream) -}}
{{- $errors = append $errors (printf "nats: files/nats-permissions.json grants stream %s, config.stream is %s; regenerate it for the new stream" $generated.stream .Values.config.stream) -}}
{{- end -}}
{{- $lineageStores := list -}}
{{- range $name, $_ := .Values.services -}}
{{- $svc := dict -}}
{{- $_ := include "cairn.service" (dict "ctx" $ "name" $name "out" $svc) -}}
{{- if and $svc.ordered $svc.enabled (gt (int $svc.replicas) 1) -}}
{{- $errors = append $errors (printf "%s: one replica records the log in order; more would split the deliveries between them and stall the chain" $name) -}}
{{- end -}}
{{- if and $svc.ordered $svc.autoscaling.enabled -}}
{{- $errors = append $errors (printf "%s: services.%s.autoscaling must stay off (it reads the log in order)" $name $name) -}}
{{- end -}}
{{- if and $svc.enabled $svc.lineageStore -}}
{{- $lineageStores = append $lineageStores $name -}}
{{- end -}}
{{- if and $svc.enabled $svc.autoscaling.enabled -}}
{{- if gt (int $svc.autoscaling.minReplicas) (int $svc.autoscaling.maxReplicas) -}}
{{- $errors = append $errors (printf "services.%s.autoscaling: minReplicas > maxReplicas" $name) -}}
{{- end -}}
{{- if and (eq $svc.autoscaling.type "hpa") (lt (int $svc.autoscaling.minReplicas) 1) -}}
{{- $errors = append $errors (printf "services.%s.autoscaling: an HPA needs minReplicas >= 1 (scale to zero needs type keda)" $name) -}}
{{- end -}}
{{- if and (eq $svc.autoscaling.type "keda") (not (index $generated.durables $name)) -}}
{{- $errors = append $errors (printf "services.%s.autoscaling: KEDA scales on consumer lag, and %s binds no durable consumer" $name $name) -}}
{{- end -}}
{{- if and (eq $svc.autoscaling.type "keda") (not (include "cairn.natsMonitoringEndpoint" $)) -}}
{{- $errors = append $errors (printf "services.%s.autoscaling: KEDA reads consumer lag from NATS monitoring; set nats.external.monitoringEndpoint" $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- with .Values.lineage.retention -}}
{{- if and (or .maxAgeSeconds .maxBytes) (not .signingKey.existingSecret) -}}
{{- $errors = append $errors "lineage.retention: a retention limit needs lineage.retention.signingKey.existingSecret (the Ed25519 key that signs the archive; cairn audit keygen)" -}}
{{- end -}}
{{- end -}}
{{- if gt (len $lineageStores) 1 -}}
{{- $errors = append $errors (printf "lineage: one service writes the lineage store; services %s all set lineageStore" (join ", " $lineageStores)) -}}
{{- end -}}
{{- if and .Values.inference.autoscaling.enabled (gt (int .Values.inference.autoscaling.minReplicas) (int .Values.inference.autoscaling.maxReplicas)) -}}
{{- $errors = append $errors "inference.autoscaling: minReplicas > maxReplicas" -}}
{{- end -}}
{{- if $errors -}}
{{- fail (printf "\n\ncairn values are inconsistent:\n  - %s\n" (join "\n  - " $errors)) -}}
{{- end -}}
{{- end -}}

{{/* Pod spec of a Dask worker: (dict "ctx" $ "group" .Values.dask.workers "extraArgs" list "limits" dict). */}}
{{- define "cairn.daskWorkerPodSpec" -}}
{{- $ := .ctx -}}
{{- $g := .group -}}
serviceAccountName: {{ include "cairn.fullname" $ }}
automountServiceAccountToken: false
{{- include "cairn.imagePullSecrets" $ }}
securityContext:
  {{- toYaml $.Values.podSecurityContext | nindent 2 }}
containers:
  - name: worker
    image: {{ include "cairn.workerImage" $ | quote }}
    imagePullPolicy: {{ $.Values.workerImage.pullPolicy }}
    # ENTRYPOINT is `dask worker`; the operator sets DASK_SCHEDULER_ADDRESS and DASK_WORKER_NAME.
    args:
      - --name
      - $(DASK_WORKER_NAME)
      - --nthreads
      - {{ $g.nthreads | quote }}
      - --dashboard-address
      - ":8788"
      - --local-directory
      - /tmp/dask
      {{- range .extraArgs }}
      - {{ . | quote }}
      {{- end }}
      {{- if include "cairn.daskTLS" $ }}
      {{- include "cairn.daskTLSArgs" $ | nindent 6 }}
      {{- end }}
    env:
      {{- include "cairn.env" $ | nindent 6 }}
      {{- if include "cairn.daskTLS" $ }}
      # Set here, the operator keeps it instead of its own tcp:// address.
      - name: DASK_SCHEDULER_ADDRESS
        value: {{ include "cairn.daskSchedulerAddress" $ | quote }}
      {{- end }}
    {{- include "cairn.envFrom" $ | nindent 4 }}
    ports:
      - name: http-dashboard
        containerPort: 8788
        protocol: TCP
    resources:
      {{- toYaml (mergeOverwrite (deepCopy $g.resources) (dict "limits" (merge (deepCopy .limits) (deepCopy (default dict $g.resources.limits))))) | nindent 6 }}
    securityContext:
      {{- toYaml $.Values.securityContext | nindent 6 }}
    volumeMounts:
      {{- include "cairn.volumeMounts" (dict "ctx" $ "artifacts" true "nats" false) | nindent 6 }}
      {{- if include "cairn.daskTLS" $ }}
      {{- include "cairn.daskTLSMount" $ | nindent 6 }}
      {{- end }}
volumes:
  {{- include "cairn.volumes" (dict "ctx" $ "artifacts" true "nats" false) | nindent 2 }}
  {{- if include "cairn.daskTLS" $ }}
  {{- include "cairn.daskTLSVolume" $ | nindent 2 }}
  {{- end }}
{{- with $g.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $g.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
