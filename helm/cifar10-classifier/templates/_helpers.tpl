{{/*
Chart name, shortened to 45 characters: Knative names a revision `<isvc>-predictor-00001`, which
must stay within 63.
*/}}
{{- define "cifar10.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 45 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: the InferenceService's name. The predictor's Service is `<fullname>-predictor`.
A release name that already contains the chart name is used as it is.
*/}}
{{- define "cifar10.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "cifar10.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every resource.
*/}}
{{- define "cifar10.labels" -}}
helm.sh/chart: {{ include "cifar10.chart" . }}
{{ include "cifar10.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: predictor
app.kubernetes.io/part-of: cifar10-classifier
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels.
*/}}
{{- define "cifar10.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cifar10.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The ServiceAccount's name.
*/}}
{{- define "cifar10.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cifar10.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The predictor image: [registry/]repository[:tag][@digest]; the CUDA image's tag with gpu.enabled,
else the CPU image's.
*/}}
{{- define "cifar10.image" -}}
{{- $ref := .Values.image.repository }}
{{- with .Values.image.registry }}{{ $ref = printf "%s/%s" . $ref }}{{ end }}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.gpu.enabled }}{{ $tag = default (printf "%s-cuda" .Chart.AppVersion) .Values.image.cudaTag }}{{ end }}
{{- if $tag }}{{ $ref = printf "%s:%s" $ref $tag }}{{ end }}
{{- with .Values.image.digest }}{{ $ref = printf "%s@%s" $ref . }}{{ end }}
{{- $ref }}
{{- end }}

{{/*
In-cluster host of the predictor. Knative mode: the cluster-local host of the Knative route
(served by knative-local-gateway, which applies the revision split). Standard mode: KServe's
`<name>-predictor` Service.
*/}}
{{- define "cifar10.predictorHost" -}}
{{- printf "%s-predictor.%s.svc.%s" (include "cifar10.fullname" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{/*
PromQL label matcher selecting this InferenceService's pods, as the PodMonitor labels them.
*/}}
{{- define "cifar10.promSelector" -}}
{{- printf "namespace=\"%s\", job=\"%s\"" .Release.Namespace (include "cifar10.fullname" .) }}
{{- end }}

{{/*
Whether the cluster serves an optional API ("group/version/Kind"), or extraAPIVersions says it will
(CRDs installed in the same sync). Called with (list $ "group/version/Kind"); "true" or "".
*/}}
{{- define "cifar10.hasAPI" -}}
{{- $root := index . 0 }}{{ $api := index . 1 }}
{{- if or ($root.Capabilities.APIVersions.Has $api) (has $api $root.Values.extraAPIVersions) }}true{{ end }}
{{- end }}

{{/*
Whether the chart's own Istio route is rendered: wanted, and Istio's VirtualService API is there.
*/}}
{{- define "cifar10.routed" -}}
{{- if and .Values.istio.virtualService.enabled (include "cifar10.hasAPI" (list . "networking.istio.io/v1/VirtualService")) }}true{{ end }}
{{- end }}

{{/*
Whether the chart creates its own Istio Gateway: asked for, or Standard mode with no gateway named
(Standard mode must not depend on Knative's knative-ingress-gateway).
*/}}
{{- define "cifar10.createGateway" -}}
{{- $auto := and (eq .Values.deploymentMode "Standard") (include "cifar10.routed" .) (not .Values.istio.virtualService.gateways) }}
{{- if and (or .Values.istio.gateway.create $auto) (include "cifar10.hasAPI" (list . "networking.istio.io/v1/Gateway")) }}true{{ end }}
{{- end }}

{{/*
Istio Gateways of the VirtualService: the configured ones plus the created one; none configured
in Knative mode means Knative's knative-ingress-gateway.
*/}}
{{- define "cifar10.gateways" -}}
{{- $gateways := list }}
{{- range .Values.istio.virtualService.gateways }}{{ $gateways = append $gateways . }}{{ end }}
{{- if include "cifar10.createGateway" . }}
{{- $gateways = append $gateways (printf "%s/%s-gateway" .Release.Namespace (include "cifar10.fullname" .)) }}
{{- else if and (not $gateways) (eq .Values.deploymentMode "Knative") }}
{{- $gateways = list "knative-serving/knative-ingress-gateway" }}
{{- end }}
{{- toYaml $gateways }}
{{- end }}

{{/*
Host names of the route: the configured ones, else `<name>.<namespace>.<domain>`, which no other
release shares (a `*` route on a shared gateway would capture every release's paths).
*/}}
{{- define "cifar10.hosts" -}}
{{- $hosts := .Values.istio.virtualService.hosts }}
{{- if not $hosts }}
{{- $hosts = list (printf "%s.%s.%s" (include "cifar10.fullname" .) .Release.Namespace .Values.istio.virtualService.domain) }}
{{- end }}
{{- toYaml $hosts }}
{{- end }}

{{/*
The timeout chain, derived here only. The predictor's deadline (REQUEST_TIMEOUT_S) comes first,
then the client-facing route: deadline + margin, plus the cold start when Knative may scale to zero
(the activator holds the request meanwhile). Each retry try may take the whole route timeout.
Knative's revision timeout (queue-proxy and activator) must not cut the route's requests, and it is
also the pods' grace period: it covers the queue-proxy drain, the predictor's drain and a margin.
*/}}
{{- define "cifar10.routeTimeoutSeconds" -}}
{{- $t := add (int .Values.limits.requestTimeoutSeconds) (int .Values.timeouts.marginSeconds) }}
{{- if and (eq .Values.deploymentMode "Knative") (eq (int .Values.autoscaling.minReplicas) 0) }}
{{- $t = add $t (int .Values.timeouts.coldStartSeconds) }}
{{- end }}
{{- $t }}
{{- end }}

{{- define "cifar10.revisionTimeoutSeconds" -}}
{{- $drain := add (include "cifar10.knativeDrainSeconds" . | int) (int .Values.shutdown.drainTimeoutSeconds) (int .Values.shutdown.marginSeconds) }}
{{- max (include "cifar10.routeTimeoutSeconds" . | int) $drain }}
{{- end }}

{{/*
Knative's progress deadline for a new revision: the image pull, then the startup probe's budget.
*/}}
{{- define "cifar10.progressDeadlineSeconds" -}}
{{- $p := .Values.probes.startup }}
{{- $budget := ternary (mul (int $p.periodSeconds) (int $p.failureThreshold)) (mul (int .Values.probes.readiness.periodSeconds) (int .Values.probes.readiness.failureThreshold)) $p.enabled }}
{{- add (int .Values.timeouts.imagePullSeconds) $budget }}
{{- end }}

{{/*
INTRA_OP_THREADS: threads.intraOp, or with 0 the container's CPU limit (at least 1; the one engine
process computes for every model.workers front end), so a GPU node with many cores does not get one thread per host core under a small
limit; 0 (the predictor reads its cgroup quota) when there is no CPU limit.
*/}}
{{- define "cifar10.intraOpThreads" -}}
{{- $cpu := toString (dig "limits" "cpu" "" .Values.resources) }}
{{- if gt (int .Values.threads.intraOp) 0 }}{{ int .Values.threads.intraOp }}
{{- else if not $cpu }}0
{{- else }}
{{- $cores := ternary (div (trimSuffix "m" $cpu | int) 1000) ($cpu | float64 | floor | int) (hasSuffix "m" $cpu) }}
{{- max 1 $cores }}
{{- end }}
{{- end }}

{{/*
Name of the predictor's port on the pod the cluster creates: Knative renames the user container's
port to `user-port` (knative/serving deploy.go, UserPortName); Standard mode keeps the chart's.
*/}}
{{- define "cifar10.metricsPortName" -}}
{{- ternary "user-port" "http1" (eq .Values.deploymentMode "Knative") }}
{{- end }}

{{/*
Whether the predictor serves gRPC on its own port (grpc.enabled). Standard mode only: a Knative
revision has a single port (knative/serving validateContainersPorts), the HTTP API's, and
queue-proxy probes readiness on it; the schema and cifar10.validate refuse it in Knative mode.
*/}}
{{- define "cifar10.grpc" -}}
{{- if and .Values.grpc.enabled (eq .Values.deploymentMode "Standard") }}true{{ end }}
{{- end }}

{{/*
Name of the gRPC port on the pod. KServe's Standard-mode Service copies it (port = the container's
number) and, after 0.15, adds appProtocol kubernetes.io/h2c to names containing grpc or h2c; Istio
reads a `grpc` name as HTTP/2 either way. An ingress gateway does not sniff the upstream protocol:
without it the gateway would speak HTTP/1.1 to the gRPC server.
*/}}
{{- define "cifar10.grpcPortName" -}}grpc{{- end }}

{{/*
The RPCs the route carries to the gRPC port, as a JSON list of exact paths: inference, metadata and
readiness of the Open Inference Protocol's GRPCInferenceService; not the model repository's RPCs
(answered UNIMPLEMENTED by the predictor anyway), as the HTTP route carries no /v2/repository path.
*/}}
{{- define "cifar10.grpcPaths" -}}
{{- $paths := list }}
{{- range list "ModelInfer" "ModelMetadata" "ModelReady" "ServerLive" "ServerMetadata" "ServerReady" }}
{{- $paths = append $paths (printf "/inference.GRPCInferenceService/%s" .) }}
{{- end }}
{{- toJson $paths }}
{{- end }}

{{/*
Grafana dashboard uid: at most 40 characters (Grafana's limit), different per namespace and release.
*/}}
{{- define "cifar10.dashboardUid" -}}
{{- printf "cifar10-%s" (sha256sum (printf "%s/%s" .Release.Namespace (include "cifar10.fullname" .)) | trunc 32) }}
{{- end }}

{{/*
Seconds Knative's queue-proxy spends draining (its preStop /wait-for-drain) before the predictor
gets SIGTERM; in Knative mode the pod's grace period is the revision timeout and must cover both.
*/}}
{{- define "cifar10.knativeDrainSeconds" -}}30{{- end }}

{{/*
terminationGracePeriodSeconds of a Standard-mode pod, derived so it always covers the preStop
sleep, the predictor's drain (DRAIN_TIMEOUT_S) and a margin for the exit.
*/}}
{{- define "cifar10.terminationGracePeriodSeconds" -}}
{{- $s := .Values.shutdown }}
{{- add (int $s.preStopSleepSeconds) (int $s.drainTimeoutSeconds) (int $s.marginSeconds) }}
{{- end }}

{{/*
The predictor's DEVICE: with gpu.enabled, `auto` becomes `cuda`, so a pod that holds a GPU but cannot
use it stops with a clear error instead of quietly serving on the CPU.
*/}}
{{- define "cifar10.device" -}}
{{- if and .Values.gpu.enabled (eq .Values.model.device "auto") -}}cuda{{- else -}}{{ .Values.model.device }}{{- end -}}
{{- end }}

{{/*
MAX_BATCH_SIZE: with `auto`, 256 on a GPU (a pass of 256 costs the GPU about twice one of 32, so
large batches are nearly free there) and 32 on a CPU (where a pass's time grows with its size).
*/}}
{{- define "cifar10.maxBatchSize" -}}
{{- if eq (toString .Values.batching.maxBatchSize) "auto" -}}{{ ternary 256 32 .Values.gpu.enabled }}{{- else -}}{{ .Values.batching.maxBatchSize }}{{- end -}}
{{- end }}

{{/*
TRUSTED_PROXY_HOPS: how many proxies in front of the predictor append to X-Forwarded-For (the rate
limit counts the address the outermost of them saw). With `auto`: 0 without the chart's Istio route
(the peer address counts, the header is ignored); behind it, Standard mode 1 (the ingress gateway)
and Knative mode 4 (ingress gateway, knative-local-gateway, activator, queue-proxy). helm/README.md,
"Rate limiting", has the reasoning.
*/}}
{{- define "cifar10.trustedProxyHops" -}}
{{- $v := .Values.rateLimit.trustedProxyHops }}
{{- if ne (toString $v) "auto" }}{{ int $v }}
{{- else if not (include "cifar10.routed" .) }}0
{{- else if eq .Values.deploymentMode "Knative" }}4
{{- else }}1
{{- end }}
{{- end }}

{{/*
Path of the API keys file inside the container (env API_KEYS_FILE), when a Secret is configured.
*/}}
{{- define "cifar10.apiKeysFile" -}}
{{- with .Values.auth.apiKeys.existingSecret }}
{{- printf "%s/%s" (trimSuffix "/" $.Values.auth.apiKeys.mountPath) $.Values.auth.apiKeys.secretKey }}
{{- end }}
{{- end }}

{{/*
Path of the key-id secret file (env KEY_ID_SECRET_FILE), mounted from the API keys' Secret with Redis:
key ids then leave the process and must be the same on every replica. Without Redis, none: each
process draws its own.
*/}}
{{- define "cifar10.keyIdSecretFile" -}}
{{- if and .Values.auth.apiKeys.existingSecret (or .Values.redis.existingSecret .Values.redis.url) }}
{{- printf "%s/%s" (trimSuffix "/" .Values.auth.apiKeys.mountPath) .Values.auth.apiKeys.keyIdSecretKey }}
{{- end }}
{{- end }}

{{/*
Labels KServe puts on the predictor pods (both modes), for the PodDisruptionBudget, the
NetworkPolicy and the Istio policies.
*/}}
{{- define "cifar10.podSelectorLabels" -}}
serving.kserve.io/inferenceservice: {{ include "cifar10.fullname" . }}
component: predictor
{{- end }}

{{/*
Checks that a JSON schema cannot express.
*/}}
{{- define "cifar10.validate" -}}
{{- if gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas) }}
{{- fail (printf "autoscaling.minReplicas (%d) must not exceed autoscaling.maxReplicas (%d)" (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- end }}
{{- if and (include "cifar10.routed" .) (not (include "cifar10.gateways" . | fromYamlArray)) }}
{{- fail "istio.virtualService needs a gateway: set istio.virtualService.gateways or istio.gateway.create" }}
{{- end }}
{{- if and (eq .Values.deploymentMode "Knative") (gt (int .Values.autoscaling.knative.containerConcurrency) 0) (gt (int .Values.autoscaling.knative.target) (int .Values.autoscaling.knative.containerConcurrency)) (eq .Values.autoscaling.knative.metric "concurrency") }}
{{- fail "autoscaling.knative.target must not exceed autoscaling.knative.containerConcurrency" }}
{{- end }}
{{- if and .Values.auth.jwt.enabled (not (and (include "cifar10.hasAPI" (list . "security.istio.io/v1/RequestAuthentication")) (include "cifar10.hasAPI" (list . "security.istio.io/v1/AuthorizationPolicy")))) }}
{{- fail "auth.jwt.enabled needs Istio's security.istio.io/v1 RequestAuthentication and AuthorizationPolicy, which this cluster does not serve (add them to extraAPIVersions if Istio is installed in the same sync)" }}
{{- end }}
{{- /* KServe refuses to change the deployment mode of an existing InferenceService: say so before it does. */}}
{{- $existing := lookup "serving.kserve.io/v1beta1" "InferenceService" .Release.Namespace (include "cifar10.fullname" .) }}
{{- $was := dig "metadata" "annotations" "serving.kserve.io/deploymentMode" "" $existing }}
{{- if and $was (ne $was .Values.deploymentMode) }}
{{- fail (printf "deploymentMode cannot change after install (InferenceService %s is %s): uninstall and install again" (include "cifar10.fullname" .) $was) }}
{{- end }}
{{- if and .Values.grpc.enabled (ne .Values.deploymentMode "Standard") }}
{{- fail "grpc.enabled needs deploymentMode=Standard: a Knative revision has one port, the HTTP API's (queue-proxy also probes readiness there); see helm/README.md, gRPC through the ingress" }}
{{- end }}
{{- if and .Values.grpc.enabled (eq (int .Values.grpc.port) (int .Values.containerPort)) }}
{{- fail (printf "grpc.port (%d) must differ from containerPort, the HTTP port" (int .Values.grpc.port)) }}
{{- end }}
{{- if and .Values.auth.apiKeys.existingSecret (has .Values.auth.apiKeys.mountPath (list "/tmp" "/app" "/")) }}
{{- fail "auth.apiKeys.mountPath must be a folder of its own" }}
{{- end }}
{{- if eq .Values.auth.apiKeys.keyIdSecretKey .Values.auth.apiKeys.secretKey }}
{{- fail "auth.apiKeys.keyIdSecretKey must differ from auth.apiKeys.secretKey: the key-id secret is not an API key" }}
{{- end }}
{{- end }}

{{/*
The files /docs loads (Swagger UI and its start-up script, served by the predictor, no CDN), as a JSON
list: routed, and public to GET under auth.jwt, wherever /docs itself is.
*/}}
{{- define "cifar10.docsAssetPaths" -}}
["/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css", "/docs/start.js", "/docs/favicon.png"]
{{- end }}

{{/*
The demo page and its two files (ui.enabled), as a JSON list: routed, and public to GET under auth.jwt.
*/}}
{{- define "cifar10.uiPaths" -}}
["/", "/ui/app.js", "/ui/style.css"]
{{- end }}
