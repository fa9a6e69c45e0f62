{{/*
The chart name, or nameOverride. Kubernetes limits label values and most names to 63 characters.
*/}}
{{- define "anomaly-exporter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object name: fullnameOverride, else <release>-<name>, or the release name
alone when it already contains the chart name. It is cut to 52 characters because the
StatefulSet controller adds a revision hash of up to 11 characters to the pod label
controller-revision-hash, which must stay within 63.
*/}}
{{- define "anomaly-exporter.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The chart label value: name and version.
*/}}
{{- define "anomaly-exporter.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels that select the pods. They never change after install, because a StatefulSet's selector
is immutable.
*/}}
{{- define "anomaly-exporter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "anomaly-exporter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of every object.
*/}}
{{- define "anomaly-exporter.labels" -}}
helm.sh/chart: {{ include "anomaly-exporter.chart" . }}
{{ include "anomaly-exporter.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
The ServiceAccount of the pods.
*/}}
{{- define "anomaly-exporter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "anomaly-exporter.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The container image with its tag, which defaults to the chart's appVersion.
*/}}
{{- define "anomaly-exporter.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
Paths inside the container. The exporter listens on port 9847 in every pod.
*/}}
{{- define "anomaly-exporter.port" -}}9847{{- end }}
{{- define "anomaly-exporter.configDir" -}}/etc/anomaly-exporter{{- end }}
{{- define "anomaly-exporter.secretsDir" -}}/etc/anomaly-exporter/secrets{{- end }}
{{- define "anomaly-exporter.stateDir" -}}/var/lib/anomaly-exporter{{- end }}

{{/*
The exporter configuration file (docs/configuration.md) built from the values. Credential
paths point at the Secret volumes that the StatefulSet mounts under secretsDir.
*/}}
{{- define "anomaly-exporter.config" -}}
{{- $secrets := include "anomaly-exporter.secretsDir" . }}
{{- $credentials := .Values.sourceCredentials }}
{{- $source := deepCopy .Values.source }}
{{- $tls := deepCopy (.Values.source.tls | default dict) }}
{{- if $credentials.bearerToken.secretName }}
{{- $_ := set $source "bearer_token_file" (printf "%s/bearer-token/%s" $secrets $credentials.bearerToken.key) }}
{{- end }}
{{- if $credentials.basicAuth.secretName }}
{{- $password := printf "%s/basic-auth/%s" $secrets $credentials.basicAuth.key }}
{{- $_ := set $source "basic_auth" (dict "username" $credentials.basicAuth.username "password_file" $password) }}
{{- end }}
{{- if $credentials.tls.caSecretName }}
{{- $_ := set $tls "ca_file" (printf "%s/tls-ca/%s" $secrets $credentials.tls.caKey) }}
{{- end }}
{{- if $credentials.tls.certSecretName }}
{{- $_ := set $tls "cert_file" (printf "%s/tls-client/%s" $secrets $credentials.tls.certKey) }}
{{- $_ := set $tls "key_file" (printf "%s/tls-client/%s" $secrets $credentials.tls.keyKey) }}
{{- end }}
{{- $_ := set $source "tls" $tls }}
{{- $config := dict "source" $source "detectors" .Values.detectors }}
{{- $_ := set $config "listen_address" (printf "0.0.0.0:%s" (include "anomaly-exporter.port" .)) }}
{{- $_ := set $config "state_dir" (include "anomaly-exporter.stateDir" .) }}
{{- toYaml $config }}
{{- end }}

{{/*
Seconds in a Prometheus duration with units from s to y, such as 6h or 1d12h. The schema
rejects ms, so "m" below never matches the m of "ms".
*/}}
{{- define "anomaly-exporter.durationSeconds" -}}
{{- $units := list (list "y" 31536000) (list "w" 604800) (list "d" 86400) (list "h" 3600) (list "m" 60) (list "s" 1) }}
{{- $seconds := 0 }}
{{- range $units }}
{{- $part := regexFind (printf "[0-9]+%s" (index . 0)) $ }}
{{- if $part }}
{{- $seconds = add $seconds (mul (trimSuffix (index . 0) $part | atoi) (index . 1)) }}
{{- end }}
{{- end }}
{{- $seconds }}
{{- end }}
