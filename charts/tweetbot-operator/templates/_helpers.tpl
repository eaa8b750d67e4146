{{- define "tweetbot.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}{{ .Release.Name | trunc 63 | trimSuffix "-" }}{{ else }}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}{{ end }}
{{- end -}}

{{- define "tweetbot.labels" -}}
app.kubernetes.io/name: tweetbot-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "tweetbot.selectorLabels" -}}
app.kubernetes.io/name: tweetbot-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The `helm test` pod's: not the operator's, so no Service, Deployment or policy of the operator selects it. */}}
{{- define "tweetbot.testSelectorLabels" -}}
app.kubernetes.io/name: tweetbot-operator-test
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tweetbot.testLabels" -}}
{{ include "tweetbot.testSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "tweetbot.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The stage pods' image: repository and tag (the tag defaults to the appVersion), or one string as before. */}}
{{- define "tweetbot.trainerImage" -}}
{{- $image := .Values.trainer.image -}}
{{- if kindIs "string" $image -}}
{{ $image }}
{{- else -}}
{{ $image.repository }}:{{ $image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{/* trainer.modelCache as the one volume source the operator mounts into train pods (JSON; empty: none). A node's
directory is created if missing, so a node without it still runs its pods (the trainer then warns and downloads). */}}
{{- define "tweetbot.modelCacheVolume" -}}
{{- $cache := .Values.trainer.modelCache | default dict -}}
{{- if $cache.volume -}}
{{ toJson $cache.volume }}
{{- else if $cache.hostPath -}}
{{ toJson (dict "hostPath" (dict "path" $cache.hostPath "type" "DirectoryOrCreate")) }}
{{- end -}}
{{- end -}}

{{/* The operator's rights: exactly what operator/tweetbot_operator/handlers.py calls. */}}
{{- define "tweetbot.rules" -}}
- apiGroups: [huggingtweets.dev]
  resources: [tweetbots]
  verbs: [get, list, watch, patch]
- apiGroups: [huggingtweets.dev]
  resources: [tweetbots/status]
  verbs: [get, patch]
- apiGroups: [huggingtweets.dev]
  resources: [tweetbots/finalizers]  # owner references with blockOwnerDeletion on the Jobs
  verbs: [update]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, delete]
- apiGroups: [""]
  resources: [pods]  # termination messages of finished stage pods
  verbs: [list]
- apiGroups: [""]
  resources: [services]  # a multi-node training's headless Service, owned by its Job (a restarted gang's Job takes it over)
  verbs: [get, create, patch]
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]  # why Kueue keeps a queued Job waiting, for the bot's status
  verbs: [list]
- apiGroups: [""]
  resources: [secrets]  # a referenced Secret's keys; S3 credentials for progress and deletion
  verbs: [get]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}

{{/* Cluster DNS, allowed to every pod a NetworkPolicy guards: without it no allowed host can be resolved. */}}
{{- define "tweetbot.dnsEgress" -}}
- to: [{namespaceSelector: {}, podSelector: {matchLabels: {k8s-app: kube-dns}}}]
  ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]
{{- end -}}
