{{/*
Labels: the kustomize base's (app.kubernetes.io/name when given, app.kubernetes.io/part-of)
and Helm's own four, which the tests ignore when they compare the chart with deploy/.
Call with (dict "root" $ "name" "kubenft-controller"); "name" may be left out.
*/}}
{{- define "kubenft.labels" -}}
{{- with .name }}
app.kubernetes.io/name: {{ . }}
{{- end }}
app.kubernetes.io/part-of: kubenft
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
{{- end }}

{{- define "kubenft.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The name the controllers' serving certificate carries and the agents check. */}}
{{- define "kubenft.controllerServerName" -}}
kubenft-controller.{{ .Release.Namespace }}.svc
{{- end }}

{{/* Whether the controllers' signer issues the certificates (tls.mode signer). */}}
{{- define "kubenft.signer" -}}
{{- $modes := list "signer" "files" -}}
{{- if not (has .Values.tls.mode $modes) -}}
{{- fail (printf "tls.mode must be one of %s, not %q" (join ", " $modes) .Values.tls.mode) -}}
{{- end -}}
{{- if eq .Values.tls.mode "signer" }}true{{ end -}}
{{- end }}

{{/* The controller's detect-local flags: none for the default mode, ClusterCIDR. */}}
{{- define "kubenft.detectLocalArgs" -}}
{{- $d := .Values.detectLocal -}}
{{- $modes := list "ClusterCIDR" "NodeCIDR" "BridgeInterface" "InterfaceNamePrefix" -}}
{{- if not (has $d.mode $modes) -}}
{{- fail (printf "detectLocal.mode must be one of %s, not %q" (join ", " $modes) $d.mode) -}}
{{- end -}}
{{- if and $d.bridgeInterface (ne $d.mode "BridgeInterface") -}}
{{- fail "detectLocal.bridgeInterface is used with detectLocal.mode=BridgeInterface only" -}}
{{- end -}}
{{- if and $d.interfaceNamePrefix (ne $d.mode "InterfaceNamePrefix") -}}
{{- fail "detectLocal.interfaceNamePrefix is used with detectLocal.mode=InterfaceNamePrefix only" -}}
{{- end -}}
{{- if ne $d.mode "ClusterCIDR" }}
- --detect-local-mode={{ $d.mode }}
{{- end }}
{{- if eq $d.mode "BridgeInterface" }}
- --pod-bridge-interface={{ required "detectLocal.bridgeInterface is required with detectLocal.mode=BridgeInterface (the pods' bridge, e.g. cni0)" $d.bridgeInterface }}
{{- end }}
{{- if eq $d.mode "InterfaceNamePrefix" }}
- --pod-interface-name-prefix={{ required "detectLocal.interfaceNamePrefix is required with detectLocal.mode=InterfaceNamePrefix (e.g. eni, cali)" $d.interfaceNamePrefix }}
{{- end }}
{{- end }}

{{/* KUBERNETES_SERVICE_HOST/PORT from the kubenft-apiserver ConfigMap (both workloads). */}}
{{- define "kubenft.apiServerEnv" -}}
- name: KUBERNETES_SERVICE_HOST
  valueFrom:
    configMapKeyRef:
      name: kubenft-apiserver
      key: KUBERNETES_SERVICE_HOST
- name: KUBERNETES_SERVICE_PORT
  valueFrom:
    configMapKeyRef:
      name: kubenft-apiserver
      key: KUBERNETES_SERVICE_PORT
{{- end }}
